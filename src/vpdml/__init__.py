"""vpdml: parameter-efficient deep metric learning with visual prompts and semantic proxies (VPTSP).

``import vpdml`` registers the ``VPDML`` PEFT type (:mod:`vpdml.tuner`), so ``get_peft_model(vit,
VisualPromptDMLConfig(...))`` and ``PeftModel.from_pretrained(vit, adapter)`` work.
``ImageEmbedder.from_pretrained(folder_or_repo).encode(images)`` embeds images with a trained adapter.
"""

from typing import TYPE_CHECKING, Any

from vpdml.models import DMLModel, FullFineTuningDML, LoRADML, as_dml_model
from vpdml.modules.backbones import SUPPORTED_MODEL_TYPES, UnsupportedBackboneError
from vpdml.proxies.loss import ProxyAnchorLoss, proxy_anchor_loss
from vpdml.tuner import (
    METHOD_PRESETS,
    VPDML_PEFT_TYPE,
    DMLForwardOutput,
    DMLLossOutput,
    VisualPromptDMLConfig,
    VisualPromptDMLModel,
    load_training_state,
    register_with_peft,
    save_training_state,
)
from vpdml.version import __version__

if TYPE_CHECKING:
    from vpdml.retrieval.embedder import ImageEmbedder


def __getattr__(name: str) -> Any:
    # ImageEmbedder pulls in `datasets` (seconds, and incompatible with some older huggingface_hub releases):
    # loaded on first use, so that `import vpdml`, which every process needs for the PEFT registration, stays light.
    if name == "ImageEmbedder":
        from vpdml.retrieval.embedder import ImageEmbedder

        return ImageEmbedder
    raise AttributeError(f"module 'vpdml' has no attribute {name!r}")


__all__ = [
    "METHOD_PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "VPDML_PEFT_TYPE",
    "DMLForwardOutput",
    "DMLLossOutput",
    "DMLModel",
    "FullFineTuningDML",
    "ImageEmbedder",
    "LoRADML",
    "ProxyAnchorLoss",
    "UnsupportedBackboneError",
    "VisualPromptDMLConfig",
    "VisualPromptDMLModel",
    "__version__",
    "as_dml_model",
    "load_training_state",
    "proxy_anchor_loss",
    "register_with_peft",
    "save_training_state",
]
