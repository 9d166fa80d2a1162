"""Loading a backbone and its image-processor settings by Hub id, folder, or ``"offline"`` (the built-in one)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from vpdml.offline import RECOMMENDED_NUM_LAYERS, load_offline_backbone


def load_backbone(name_or_path: str, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a vision backbone by Hub id or folder: ``AutoModel`` (``CLIPVisionModel`` for CLIP checkpoints).

    ``"offline"`` loads vpdml's built-in offline DINOv2 ViT-S/14 with its recommended first 11 blocks
    (:func:`vpdml.offline.load_offline_backbone`). ViT and DeiT load without their pooler: vpdml's head reads the
    final norm's tokens, so the pooler would only add unused (and, for DINOv2 conversions, random) weights.
    """
    if name_or_path == "offline":
        return load_offline_backbone(num_layers=RECOMMENDED_NUM_LAYERS)
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if config.model_type in ("vit", "deit"):
        from_pretrained_kwargs.setdefault("add_pooling_layer", False)
    return AutoModel.from_pretrained(name_or_path, **from_pretrained_kwargs)


def load_image_processor(name_or_path: str) -> dict[str, Any]:
    """The backbone's image-processor settings (mean, std, size), or ``{}`` (ImageNet statistics) if it has none."""
    if name_or_path == "offline":
        return {}  # the offline DINOv2 uses ImageNet statistics, vpdml's default
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path).to_dict()
    except (OSError, ValueError) as error:
        warnings.warn(
            f"No image processor for {name_or_path} ({error.__class__.__name__}); using ImageNet mean/std.",
            stacklevel=2,
        )
        return {}
