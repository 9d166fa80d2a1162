"""The VPTSP PEFT tuner: config, prompted blocks, the tuner model, and its training-only state.

Importing this package registers the ``VPDML`` PEFT type, as PEFT's own ``tuners/<method>/__init__.py`` do.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from vpdml.tuner.config import METHOD_PRESETS, VisualPromptDMLConfig
from vpdml.tuner.model import VisualPromptDMLModel
from vpdml.tuner.outputs import DMLForwardOutput, DMLLossOutput
from vpdml.tuner.peft_type import PEFT_METHOD_NAME, PREFIX, VPDML_PEFT_TYPE
from vpdml.tuner.state import load_training_state, save_training_state


def register_with_peft() -> None:
    """Make ``get_peft_model``/``PeftModel.from_pretrained`` know ``VisualPromptDMLConfig`` (idempotent)."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(VPDML_PEFT_TYPE) is VisualPromptDMLConfig:
        return
    register_peft_method(
        name=PEFT_METHOD_NAME, config_cls=VisualPromptDMLConfig, model_cls=VisualPromptDMLModel, prefix=PREFIX
    )


register_with_peft()

__all__ = [
    "METHOD_PRESETS",
    "VPDML_PEFT_TYPE",
    "DMLForwardOutput",
    "DMLLossOutput",
    "VisualPromptDMLConfig",
    "VisualPromptDMLModel",
    "load_training_state",
    "register_with_peft",
    "save_training_state",
]
