"""vpdml: parameter-efficient deep metric learning with visual prompts and semantic proxies (VPTSP).

``import vpdml`` registers the ``VPDML`` PEFT type, so ``get_peft_model(vit, VisualPromptDMLConfig(...))`` and
``PeftModel.from_pretrained(vit, adapter)`` work.
"""

from .architectures import SUPPORTED_MODEL_TYPES, UnsupportedBackboneError
from .config import METHOD_PRESETS, VisualPromptDMLConfig
from .full_finetune import FullFineTuningDML
from .losses import ProxyAnchorLoss, proxy_anchor_loss
from .model import DMLForwardOutput, DMLLossOutput, VisualPromptDMLModel
from .registration import VPDML_PEFT_TYPE, register_with_peft
from .training_state import load_training_state, save_training_state

register_with_peft()

__version__ = "0.1.0"

__all__ = [
    "METHOD_PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "VPDML_PEFT_TYPE",
    "DMLForwardOutput",
    "DMLLossOutput",
    "FullFineTuningDML",
    "ProxyAnchorLoss",
    "UnsupportedBackboneError",
    "VisualPromptDMLConfig",
    "VisualPromptDMLModel",
    "__version__",
    "load_training_state",
    "proxy_anchor_loss",
    "save_training_state",
]
