"""Trainable DML models and the one interface training and retrieval use for all of them."""

from vpdml.models.full_finetune import FullFineTuningDML
from vpdml.models.lora import LoRADML
from vpdml.models.protocol import DMLModel, as_dml_model

__all__ = ["DMLModel", "FullFineTuningDML", "LoRADML", "as_dml_model"]
