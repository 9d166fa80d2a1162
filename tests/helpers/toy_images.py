"""Generated images for fast training tests: classes a tiny *random* ViT can learn to tell apart.

Each 32 px image has a class-defining top part (a 2 x 2 layout of four palette colours; a class is one layout)
and a bottom stripe of a random colour that has nothing to do with the class. A frozen random ViT's pooled
feature is dominated by average colour, so the stripe confuses zero-shot retrieval; a trained head learns to
ignore it. Test classes are new layouts of the same colours, so what is learned transfers across classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from vpdml.data import DMLSplits, load_dml_dataset

PALETTE = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 210, 40]], dtype=np.float64)
IMAGE_SIZE = 32
NORMALISATION = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def class_layouts(num_classes: int, seed: int) -> np.ndarray:
    """``(num_classes, 4)`` distinct palette indices (top-left, top-right, bottom-left, bottom-right)."""
    combos = np.array(np.meshgrid(*[range(len(PALETTE))] * 4, indexing="ij")).reshape(4, -1).T
    if num_classes > len(combos):
        raise ValueError(f"At most {len(combos)} classes, asked for {num_classes}.")
    return combos[np.random.default_rng(seed + 1).permutation(len(combos))[:num_classes]]


def draw(layout: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One image of a class: jittered layout, random brightness and noise, random-colour bottom stripe."""
    image = np.zeros((size, size, 3))
    top = size - size // 4
    row = top // 2 + int(rng.integers(-2, 3))
    col = size // 2 + int(rng.integers(-3, 4))
    image[:row, :col] = PALETTE[layout[0]]
    image[:row, col:] = PALETTE[layout[1]]
    image[row:top, :col] = PALETTE[layout[2]]
    image[row:top, col:] = PALETTE[layout[3]]
    image[:top] *= 0.7 + 0.3 * rng.random()
    image[top:] = rng.integers(0, 256, 3)
    image += rng.normal(0, 15, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def layout_dataset(num_classes: int = 60, per_class: int = 6, seed: int = 0) -> Dataset:
    """A ``datasets.Dataset`` with ``image`` and ``label`` (ClassLabel), classes in blocks of ``per_class``."""
    rng = np.random.default_rng(seed)
    layouts = class_layouts(num_classes, seed)
    images, labels = [], []
    for label, layout in enumerate(layouts):
        for _ in range(per_class):
            images.append(draw(layout, rng))
            labels.append(label)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=num_classes)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def layout_splits(
    num_classes: int = 60, per_class: int = 6, seed: int = 0, validation_classes: int = 8
) -> DMLSplits:
    """Class-disjoint splits: 2/3 of the classes train (``validation_classes`` of them held out), 1/3 test."""
    return load_dml_dataset(
        layout_dataset(num_classes, per_class, seed),
        train_fraction=2 / 3,
        validation_classes=validation_classes,
        seed=seed,
    )


def write_image_folder(root: Path, num_classes: int = 6, per_class: int = 3, seed: int = 0) -> Path:
    """An image folder ``root/class_<k>/<i>.png`` (the layout classes), for the CLI tests."""
    rng = np.random.default_rng(seed)
    for label, layout in enumerate(class_layouts(num_classes, seed)):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            draw(layout, rng).save(folder / f"{index}.png")
    return root
