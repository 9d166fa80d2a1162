"""Loading a backbone and its image-processor settings by Hub id, folder, or the built-in offline one.

The offline backbone answers to ``"offline"`` (its recommended first 11 blocks) and to its portable names
(``vpdml/offline-dinov2-vits14[-<N>-blocks]``, what adapters trained on it record); both are rebuilt from the
pinned wheel when the cache is empty.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from vpdml.offline import (
    RECOMMENDED_NUM_LAYERS,
    load_offline_backbone,
    offline_backbone_name,
    parse_offline_backbone_name,
)

OFFLINE_ALIAS = "offline"
# <cache>/models--owner--name/snapshots/<commit>: a Hub download, named by its repo id
_HUB_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)")


def offline_spec(name_or_path: str) -> dict[str, Any] | None:
    """How to build the offline backbone ``name_or_path`` names (``load_offline_backbone`` kwargs), else None."""
    if name_or_path == OFFLINE_ALIAS:
        return {"as_dinov2": False, "num_layers": RECOMMENDED_NUM_LAYERS}
    return parse_offline_backbone_name(name_or_path)


def portable_backbone_name(name_or_path: str) -> str:
    """A name for the backbone that loads on other machines, where one is known; else ``name_or_path``.

    The offline backbone (``"offline"``, its cache folder) -> its portable name; a Hub cache snapshot folder
    (``.../models--owner--name/snapshots/<commit>``) -> ``owner/name``. A Hub id stays as it is, and so does any
    other local folder (it has no name outside this machine).
    """
    spec = offline_spec(name_or_path)
    if spec is not None:
        return offline_backbone_name(**spec)
    path = Path(name_or_path)
    if path.parent.name == "snapshots":
        match = _HUB_SNAPSHOT.fullmatch(path.parent.parent.name)
        if match is not None:
            return f"{match['owner']}/{match['name']}"
    return name_or_path


def load_backbone(name_or_path: str, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a vision backbone by Hub id or folder: ``AutoModel`` (``CLIPVisionModel`` for CLIP checkpoints).

    ``"offline"`` and the offline backbone's portable names build vpdml's DINOv2 ViT-S/14
    (:func:`vpdml.offline.load_offline_backbone`). ViT and DeiT load without their pooler: vpdml's head reads the
    final norm's tokens, so the pooler would only add unused (and, for DINOv2 conversions, random) weights.
    """
    spec = offline_spec(name_or_path)
    if spec is not None:
        return load_offline_backbone(**spec)
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if config.model_type in ("vit", "deit"):
        from_pretrained_kwargs.setdefault("add_pooling_layer", False)
    return AutoModel.from_pretrained(name_or_path, **from_pretrained_kwargs)


def load_image_processor(name_or_path: str) -> dict[str, Any]:
    """The backbone's image-processor settings (mean, std, size), or ``{}`` (ImageNet statistics) if it has none."""
    if offline_spec(name_or_path) is not None:
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
