"""The evaluation transform as a transformers image-processor config (``preprocessor_config.json``) and back.

:class:`~vpdml.data.transforms.EvalTransform` (shorter side to ``resize_size``, bilinear; center crop ``size``;
``/ 255``; ``(x - mean) / std``) is what ``BitImageProcessor`` does with ``size={"shortest_edge": resize_size}``,
``crop_size=size`` and ``resample=BILINEAR``, so ``AutoImageProcessor.from_pretrained(adapter_folder)`` gives the
pixels vpdml evaluated with (exactly with transformers' PIL backend; its torchvision backend resizes with
torch kernels, within about 1/255 per pixel before normalisation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vpdml.atomic_io import atomic_write_json
from vpdml.data.transforms import EvalTransform

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_CLASS = "BitImageProcessor"
PIL_BILINEAR = 2


def processor_config(transform: EvalTransform) -> dict[str, Any]:
    """The ``preprocessor_config.json`` content that reproduces ``transform``."""
    return {
        "image_processor_type": PROCESSOR_CLASS,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": int(transform.resize_size or transform.size)},
        "resample": PIL_BILINEAR,
        "do_center_crop": True,
        "crop_size": {"height": transform.size, "width": transform.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(transform.mean),
        "image_std": list(transform.std),
    }


def write_processor_config(transform: EvalTransform, directory: Path) -> Path:
    """Write :func:`processor_config` of ``transform`` to ``directory/preprocessor_config.json``."""
    path = Path(directory) / PREPROCESSOR_CONFIG_FILE
    atomic_write_json(path, processor_config(transform))
    return path


def is_vpdml_processor_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` has the shape :func:`processor_config` writes (shortest-edge resize, then a square crop)."""
    size, crop = config.get("size"), config.get("crop_size")
    return (
        isinstance(size, Mapping)
        and isinstance(size.get("shortest_edge"), int)
        and isinstance(crop, Mapping)
        and crop.get("height") == crop.get("width")
        and isinstance(crop.get("height"), int)
        and config.get("do_center_crop", False) is True
    )


def eval_transform_from_config(config: Mapping[str, Any]) -> EvalTransform:
    """The :class:`EvalTransform` a :func:`processor_config` describes.

    Raises:
        ValueError: for a config of another shape (a backbone's own processor: use ``transforms_from_processor``).
    """
    if not is_vpdml_processor_config(config):
        raise ValueError(
            "Not a vpdml preprocessor config (needs size.shortest_edge, a square crop_size and do_center_crop): "
            f"{dict(config)!r}"
        )
    normalise = config.get("do_normalize", True) is not False
    return EvalTransform(
        size=int(config["crop_size"]["height"]),
        resize_size=int(config["size"]["shortest_edge"]),
        mean=tuple(config.get("image_mean", (0.0, 0.0, 0.0))) if normalise else (0.0, 0.0, 0.0),
        std=tuple(config.get("image_std", (1.0, 1.0, 1.0))) if normalise else (1.0, 1.0, 1.0),
    )


def read_processor_config(directory: Path) -> dict[str, Any] | None:
    """``directory/preprocessor_config.json`` as a dict, or ``None`` when there is none."""
    path = Path(directory) / PREPROCESSOR_CONFIG_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
