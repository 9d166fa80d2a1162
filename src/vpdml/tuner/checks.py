"""Validation of what a user or a file hands the tuner: backbone signatures and adapter tensors."""

from __future__ import annotations

from collections.abc import Callable

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
