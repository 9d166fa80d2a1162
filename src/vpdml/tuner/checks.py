"""Validation of what a user or a file hands the tuner: backbone signatures and adapter tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vpdml.modules.backbones import BackboneInfo
from vpdml.tuner.config import VisualPromptDMLConfig


def check_backbone_signature(config: VisualPromptDMLConfig, info: BackboneInfo) -> None:
    expected = config.backbone_signature
    if not expected:
        return
    actual = info.signature()
    diffs = [
        f"{key}: adapter {expected[key]!r} vs model {actual.get(key)!r}"
        for key in expected
        if expected[key] != actual.get(key)
    ]
    if diffs:
        base = config.base_model_name_or_path or "the base model named in adapter_config.json"
        raise ValueError(
            "This vpdml adapter was made for a different backbone (" + "; ".join(diffs) + "). Load it onto "
            f"{base} (base_model_name_or_path), e.g. PeftModel.from_pretrained(AutoModel.from_pretrained(...), path)."
        )


def check_adapter_tensors(
    expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], file_key: Callable[[str], str]
) -> None:
    """Refuse an adapter file with missing, unexpected, misshapen or non-finite tensors, naming them as the file
    does (``file_key`` maps a model key back to its key in the file)."""
    missing = sorted(file_key(key) for key in set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "adapter_model.safetensors does not match its adapter_config.json: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
            "The file is incomplete, tampered with, or belongs to another adapter; save it again with save_pretrained."
        )
    for key, reference in expected.items():
        tensor = loaded[key]
        if tensor.shape != reference.shape:
            raise ValueError(
                f"adapter_model.safetensors: {file_key(key)} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(reference.shape)}."
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"adapter_model.safetensors: {key} contains NaN or Inf values; the adapter is unusable."
            )


def check_pixel_values(pixel_values: torch.Tensor, info: BackboneInfo, backbone_config: Any) -> None:
    """A (B, C, H, W) float batch of at least one image and one patch, or an error that says how to fix it."""
    channels = getattr(backbone_config, "num_channels", 3)
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor of shape (B, {channels}, H, W), got {type(pixel_values)}."
        )
    if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values must have shape (B, {channels}, H, W), got {tuple(pixel_values.shape)}. Use the "
            "backbone's image processor or vpdml.data transforms to turn images into tensors."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (B = 0): pass at least one image.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point (normalised images), got {pixel_values.dtype}. Convert uint8 "
            "images with the backbone's image processor."
        )
    height, width = pixel_values.shape[-2:]
    if height < info.patch_size or width < info.patch_size:
        raise ValueError(
            f"pixel_values are {height}x{width}, smaller than one {info.patch_size}x{info.patch_size} patch."
        )


def check_labels(labels: torch.Tensor, pixel_values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels as int64 class ids, one per image, in [0, num_classes)."""
    labels = torch.as_tensor(labels, device=pixel_values.device)
    if labels.dim() != 1 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"labels must be a 1-D tensor with one class id per image ({pixel_values.shape[0]}), got shape "
            f"{tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]. Remap the training labels to 0..C-1."
        )
    return labels.long()
