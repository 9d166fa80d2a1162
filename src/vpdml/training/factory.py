"""What a run is built from: the data of a named benchmark and the model for a method name."""

from __future__ import annotations

from typing import Any

from peft import get_peft_model
from torch import nn

from vpdml.data import load_dml_dataset
from vpdml.models.full_finetune import FullFineTuningDML
from vpdml.models.lora import LoRADML
from vpdml.models.protocol import as_dml_model
from vpdml.offline import emoji_splits, icon_splits, kanji_splits
from vpdml.training.args import METHODS
from vpdml.tuner.config import METHOD_PRESETS, VisualPromptDMLConfig

__all__ = ["build_model", "describe_method", "load_splits"]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_FULL_FINETUNE_OPTIONS = {
    "embedding_dim",
    "pooling",
    "proxy_anchor_scale",
    "proxy_anchor_margin",
    "proxy_anchor_positive_average",
    "proxy_negatives",
    "proxy_offload",
}


LORA_OPTIONS = {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"}
#: semantic proxies on top of LoRA (:class:`vpdml.LoRADML`): the prompt tuner's proxy pass, LoRA's backbone
LORA_SEMANTIC_OPTIONS = {
    "semantic_proxies",
    "class_prompts",
    "proxy_pass_layers",
    "semantic_images_per_class",
    "proxy_mix_alpha",
    "proxy_pass_tokens",
}


def build_model(backbone: nn.Module, method: str, num_classes: int, **config_overrides: Any) -> nn.Module:
    """A trainable DML model around ``backbone``.

    Args:
        backbone: a supported transformers vision model (``ViTModel``, ``Dinov2Model``, ...).
        method: ``linear``, ``vpt``, ``vpt-bitfit``, ``vptsp-m``, ``vptsp-g`` (PEFT adapters), ``lora``
            (:class:`vpdml.LoRADML`: PEFT's LoRA with vpdml's head and loss) or ``full-finetune``
            (:class:`vpdml.FullFineTuningDML`).
        num_classes: number of training classes (labels ``0..C-1``).
        **config_overrides: :class:`vpdml.VisualPromptDMLConfig` fields (``num_prompts=``, ``embedding_dim=``...);
            full fine-tuning takes ``embedding_dim``, ``pooling`` and the ``proxy_anchor_*`` options, LoRA those,
            ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` and, for semantic proxies on
            top of LoRA, ``semantic_proxies``, ``class_prompts``, ``proxy_pass_layers``, ``proxy_pass_tokens``,
            ``semantic_images_per_class``, ``proxy_mix_alpha``.
    """
    if method in ("full-finetune", "lora"):
        accepted = _FULL_FINETUNE_OPTIONS | (
            LORA_OPTIONS | LORA_SEMANTIC_OPTIONS if method == "lora" else set()
        )
        unknown = sorted(set(config_overrides) - accepted)
        if unknown:
            raise ValueError(
                f"{method} does not take {unknown}; it accepts {sorted(accepted)} (prompts and semantic proxies are "
                "adapter options)."
            )
        model_class = LoRADML if method == "lora" else FullFineTuningDML
        return model_class(backbone, num_classes=num_classes, **config_overrides)
    if method not in METHOD_PRESETS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    unknown = sorted(set(config_overrides) - VisualPromptDMLConfig.field_names())
    if unknown:
        raise ValueError(f"Unknown VisualPromptDMLConfig option(s) {unknown}.")
    config = VisualPromptDMLConfig.for_method(method, num_classes=num_classes, **config_overrides)
    return get_peft_model(backbone, config)


def describe_method(model: nn.Module) -> str:
    """Human-readable name of what ``model`` trains: ``VPTSP-G``, ``VPT + BitFit``, ``Full fine-tuning``..."""
    return as_dml_model(model).describe()


def load_splits(dataset: str, data_dir: str | None, validation_classes: int | float, seed: int) -> Any:
    """DMLSplits of a named benchmark, an image folder, a Hub dataset, or an offline benchmark (``emoji``, ``icons``,
    ``kanji``)."""
    offline = {"emoji": emoji_splits, "icons": icon_splits, "kanji": kanji_splits}
    if dataset in offline:
        if isinstance(validation_classes, float):
            raise ValueError(f"--dataset {dataset} takes an integer --validation-classes count.")
        return offline[dataset](seed=seed, validation_classes=validation_classes)
    return load_dml_dataset(dataset, data_dir=data_dir, validation_classes=validation_classes, seed=seed)
