"""Train/eval transforms (PIL + numpy + torch), mode conversion, reproducible augmentation, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from vpdml.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DMLTransformDataset,
    EvalTransform,
    TrainTransform,
    collate,
    random_resized_crop_box,
    to_rgb,
    transforms_from_processor,
)


def gradient_image(width: int, height: int) -> Image.Image:
    """Red encodes the column, green the row: a crop's position can be read back from its pixels."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    array = np.stack([xs * 10 % 256, ys * 10 % 256, np.full_like(xs, 77)], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


def expected_normalized(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("transform", [TrainTransform(size=32), EvalTransform(size=32)])
def test_constant_image_normalizes_to_known_values(transform: TrainTransform | EvalTransform) -> None:
    output = transform(Image.new("RGB", (50, 40), (124, 116, 104)), seeded(0))
    assert output.shape == (3, 32, 32) and output.dtype == torch.float32
    expected = expected_normalized((124, 116, 104)).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


def test_eval_transform_center_crop_picks_the_center() -> None:
    # shorter side already equals resize_size, so no resampling: the crop is exact pixels
    output = EvalTransform(size=8, resize_size=10)(gradient_image(20, 10))
    red = output[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    green = output[1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    torch.testing.assert_close(red[0] * 255, torch.arange(6, 14) * 10.0, atol=1e-3, rtol=0)  # columns 6..13
    torch.testing.assert_close(green[:, 0] * 255, torch.arange(1, 9) * 10.0, atol=1e-3, rtol=0)  # rows 1..8


def test_eval_transform_resizes_shorter_side_to_size_over_0875() -> None:
    transform = EvalTransform(size=224)
    assert transform.resize_size == 256
    assert transform(Image.new("RGB", (1000, 300))).shape == (3, 224, 224)
    assert transform(Image.new("RGB", (5, 9))).shape == (3, 224, 224)  # tiny images are upscaled


def test_train_transform_is_reproducible_from_the_generator() -> None:
    image, transform = gradient_image(64, 48), TrainTransform(size=16)
    first = transform(image, seeded(1))
    assert torch.equal(first, transform(image, seeded(1)))
    assert not torch.equal(first, transform(image, seeded(2)))


def test_train_transform_flip_mirrors_the_image() -> None:
    image = gradient_image(16, 16)
    full_crop = {"size": 16, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    kept = TrainTransform(**full_crop, flip_probability=0.0)(image, seeded(0))
    flipped = TrainTransform(**full_crop, flip_probability=1.0)(image, seeded(0))
    torch.testing.assert_close(flipped, kept.flip(-1))
    torch.testing.assert_close(kept, EvalTransform(size=16, resize_size=16)(image))


def test_random_resized_crop_boxes_stay_inside_and_respect_scale_and_ratio() -> None:
    generator = seeded(0)
    for _ in range(200):
        box = random_resized_crop_box(120, 80, (0.08, 1.0), (3 / 4, 4 / 3), generator)
        assert box.top >= 0 and box.top + box.height <= 80
        assert box.left >= 0 and box.left + box.width <= 120
        assert 0.07 <= box.width * box.height / (120 * 80) <= 1.0
        assert 3 / 4 - 0.05 <= box.width / box.height <= 4 / 3 + 0.05


def test_random_resized_crop_falls_back_to_a_clamped_center_crop() -> None:
    # a 100x1 strip cannot hold any crop with ratio <= 4/3 and area >= 50%: fall back to the center
    box = random_resized_crop_box(100, 1, (0.5, 1.0), (3 / 4, 4 / 3), seeded(0))
    assert (box.height, box.width) == (1, 1) and box.left == 49


@pytest.mark.parametrize(
    ("image", "expected_rgb"),
    [
        (Image.new("L", (4, 4), 90), (90, 90, 90)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("LA", (4, 4), (40, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (Image.new("I", (4, 4), 200), (200, 200, 200)),  # 8-bit range in a 32-bit image
        (Image.new("F", (4, 4), 0.5), (128, 128, 128)),
    ],
)
def test_to_rgb_converts_any_mode(image: Image.Image, expected_rgb: tuple[int, int, int]) -> None:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.getpixel((1, 1)) == expected_rgb


def test_to_rgb_composites_palette_transparency_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([200, 0, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    del image.info["transparency"]
    assert to_rgb(image).getpixel((0, 0)) == (200, 0, 0)


def test_transforms_accept_non_rgb_inputs() -> None:
    output = TrainTransform(size=8)(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), seeded(0))
    torch.testing.assert_close(output, expected_normalized((255, 255, 255)).view(3, 1, 1).expand(3, 8, 8))


def test_transforms_from_a_processor_dict() -> None:
    settings = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25] * 3, "size": {"height": 384, "width": 384}}
    train, evaluation = transforms_from_processor(settings)
    assert train.size == evaluation.size == 384 and evaluation.resize_size == 439
    assert train.mean == evaluation.mean == (0.5, 0.5, 0.5) and train.std == (0.25, 0.25, 0.25)
    output = evaluation(Image.new("RGB", (10, 10), (255, 0, 255)))
    assert output[:, 0, 0].tolist() == [2.0, -2.0, 2.0]


def test_crop_size_wins_over_size_and_image_size_over_both() -> None:
    settings = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
    train, evaluation = transforms_from_processor(settings)
    assert (train.size, evaluation.resize_size) == (224, 256)
    train, evaluation = transforms_from_processor(settings, image_size=112, crop_fraction=1.0)
    assert (train.size, evaluation.resize_size) == (112, 112)


def test_transforms_from_a_transformers_processor() -> None:
    transformers = pytest.importorskip("transformers")
    processor = transformers.ViTImageProcessor(size={"height": 96, "width": 96}, do_normalize=False)
    train, evaluation = transforms_from_processor(processor)
    assert train.size == 96 and evaluation.mean == (0.0, 0.0, 0.0) and evaluation.std == (1.0, 1.0, 1.0)


def test_bad_settings_fail_clearly() -> None:
    with pytest.raises(TypeError, match="image processor"):
        transforms_from_processor(42)
    with pytest.raises(ValueError, match="1 or 3 values"):
        transforms_from_processor({"image_mean": [0.1, 0.2]})
    with pytest.raises(ValueError, match="resize_size"):
        EvalTransform(size=224, resize_size=200)
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(scale=(0.5, 0.1))
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb(np.zeros((4, 4, 3)))  # type: ignore[arg-type]


def image_dataset(num_rows: int = 6) -> Dataset:
    images = [gradient_image(24 + row, 20) for row in range(num_rows)]
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    return Dataset.from_dict(
        {"image": images, "label": [row % 3 for row in range(num_rows)]}, features=features
    )


def test_transform_dataset_yields_pixel_values_and_labels() -> None:
    dataset = DMLTransformDataset(image_dataset(), EvalTransform(size=16))
    sample = dataset[4]
    assert set(sample) == {"pixel_values", "labels"}
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["labels"] == 1
    assert len(dataset) == 6


def test_augmentation_depends_only_on_seed_epoch_and_index() -> None:
    dataset = DMLTransformDataset(image_dataset(), TrainTransform(size=16), seed=11)
    forward = [dataset[index]["pixel_values"] for index in range(6)]
    backward = [dataset[index]["pixel_values"] for index in reversed(range(6))][::-1]
    assert all(
        torch.equal(a, b) for a, b in zip(forward, backward, strict=True)
    )  # access order does not matter
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], forward[0])
    dataset.set_epoch(0)
    assert torch.equal(dataset[0]["pixel_values"], forward[0])


def test_collate_stacks_a_dataloader_batch() -> None:
    dataset = DMLTransformDataset(image_dataset(), TrainTransform(size=16), seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 0]


def test_transform_dataset_reports_missing_columns() -> None:
    with pytest.raises(KeyError, match="lacks column"):
        DMLTransformDataset(image_dataset(), EvalTransform(), label_column="target")
