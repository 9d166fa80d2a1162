"""preprocessor_config.json: the eval transform as a transformers image processor, and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vpdml.data import EvalTransform
from vpdml.data.processor_config import (
    eval_transform_from_config,
    processor_config,
    read_processor_config,
    write_processor_config,
)
from vpdml.data.transforms import center_crop_box


def _images() -> list[Image.Image]:
    """Odd and even margins around the crop, portrait and landscape, transparency, grayscale, a palette."""
    rng = np.random.default_rng(0)
    shapes = [(97, 131), (200, 120), (64, 64), (123, 321), (96, 99), (40, 43), (31, 90)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (70, 45, 4), dtype=np.uint8)))  # RGBA: over white
    images.append(images[0].convert("L"))
    images.append(images[1].convert("P"))
    return images


@pytest.mark.parametrize(
    "transform",
    [
        EvalTransform(size=84),
        EvalTransform(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        EvalTransform(size=224),
        EvalTransform(size=30, resize_size=33),  # margins of 3 (Python's round would put the crop 1 px lower)
    ],
)
def test_auto_image_processor_gives_the_eval_transform_pixels(tmp_path, transform):
    transformers = pytest.importorskip("transformers")
    write_processor_config(transform, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    images = _images()
    expected = torch.stack([transform(image) for image in images])
    actual = torch.from_numpy(np.stack(processor(images, return_tensors="np").pixel_values))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_config_round_trip_and_file(tmp_path):
    transform = EvalTransform(size=84, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    config = processor_config(transform)
    assert config["size"] == {"shortest_edge": 96} and config["crop_size"] == {"height": 84, "width": 84}
    assert config["resample"] == 2 and config["image_processor_type"] == "BitImageProcessor"
    assert eval_transform_from_config(config) == transform
    assert read_processor_config(tmp_path) is None
    write_processor_config(transform, tmp_path)
    assert eval_transform_from_config(read_processor_config(tmp_path)) == transform


def test_a_backbone_processor_config_is_not_taken_for_a_vpdml_one():
    vit = {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}}
    with pytest.raises(ValueError, match="Not a vpdml preprocessor config"):
        eval_transform_from_config(vit)


def test_center_crop_rounds_down_like_transformers():
    assert center_crop_box(33, 33, 30) == center_crop_box(33, 33, 30).__class__(1, 1, 30, 30)
    assert center_crop_box(37, 30, 30).left == 3  # (37 - 30) // 2; round(3.5) would give 4
