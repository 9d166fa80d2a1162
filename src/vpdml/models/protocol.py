"""One interface over the kinds of trainable DML model: what training and retrieval ask of a model.

vpdml trains and embeds with a ``PeftModel`` holding a vpdml adapter (prompts, head, BitFit, proxies) or a
:class:`~vpdml.FullFineTuningDML` (trainable backbone, head, proxies). :func:`as_dml_model` wraps either in a
:class:`DMLModel`; this module is the only place that asks which kind of model it holds.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from vpdml.atomic_io import load_safetensors_file
from vpdml.models.full_finetune import FullFineTuningDML
from vpdml.modules.backbones import pooled_features
from vpdml.proxies.bank import ProxyBank
from vpdml.proxies.loss import LossSettings
from vpdml.tuner.config import VisualPromptDMLConfig
from vpdml.tuner.model import VisualPromptDMLModel
from vpdml.tuner.outputs import DMLForwardOutput
from vpdml.tuner.state import TRAINING_STATE_FILE, load_training_state, save_training_state

__all__ = ["DMLModel", "as_dml_model"]

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


class DMLModel(ABC):
    """A trainable DML model seen the same way whatever its kind; ``module`` is the model the user holds."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # --- parts --------------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The transformers backbone (frozen or not)."""

    @property
    @abstractmethod
    def head(self) -> nn.Module:
        """The embedding head (its input is the backbone's pooled feature)."""

    @property
    @abstractmethod
    def proxy_bank(self) -> ProxyBank | None:
        """Learnable proxies (and semantic-proxy state) of the trained classes; None for an embed-only model."""

    @property
    @abstractmethod
    def loss_settings(self) -> LossSettings: ...

    @property
    @abstractmethod
    def host_resident_options(self) -> dict[str, bool]:
        """The options that keep tables in host memory (which DDP cannot wrap), by name: on or off."""

    #: a PEFT adapter (saved as an adapter, with a model card, pushable to the Hub)
    is_adapter: bool = False
    #: parameters DDP never sees a gradient for (full fine-tuning's unused pooler)
    has_unused_parameters: bool = False

    @property
    def num_classes(self) -> int:
        bank = self.proxy_bank
        if bank is None:
            raise ValueError(
                "The model has no proxies (it was loaded for inference or built without num_classes): build it "
                "with vpdml.training.build_model(backbone, method, num_classes=<training classes>) to train it."
            )
        return bank.num_classes

    # --- passes -------------------------------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(B, E)`` embeddings."""
        return self.module.embed(pixel_values)

    @abstractmethod
    def dml_forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> DMLForwardOutput:
        """Embeddings of a training batch and this step's semantic-proxy rows, if any (no loss yet)."""

    @abstractmethod
    @contextlib.contextmanager
    def zero_shot(self) -> Iterator[EmbedFn]:
        """Yield ``pixel_values -> (B, D)``: the frozen backbone's normalised pooled feature."""

    @abstractmethod
    def describe(self) -> str:
        """Human-readable name of what is trained: ``VPTSP-G``, ``VPT + BitFit``, ``Full fine-tuning``..."""

    # --- files --------------------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: Path, *, with_training_state: bool = True) -> None:
        """``save_pretrained`` files (and, for adapters, the training-only state) into ``directory``."""

    @abstractmethod
    def load(self, directory: Path, *, with_training_state: bool = True) -> None:
        """Load what :meth:`save` wrote, in place, checking that every key matched."""

    @abstractmethod
    def identity_content(
        self, adapter_name: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, config)`` that identify the inference weights (what retrieval indexes are checked by)."""


class PeftDMLModel(DMLModel):
    """A ``PeftModel`` whose active adapter is a vpdml adapter."""

    is_adapter = True

    def __init__(self, module: PeftModel) -> None:
        if not isinstance(module.base_model, VisualPromptDMLModel):
            raise TypeError(
                f"This PeftModel holds a {type(module.base_model).__name__} adapter, not a vpdml one: create it with "
                "vpdml.VisualPromptDMLConfig (or vpdml.training.build_model)."
            )
        super().__init__(module)
        self.tuner: VisualPromptDMLModel = module.base_model

    @property
    def adapter(self) -> str:
        return self.tuner.resolve_adapter(None)

    @property
    def config(self) -> VisualPromptDMLConfig:
        return self.module.peft_config[self.adapter]

    @property
    def backbone(self) -> nn.Module:
        return self.tuner.model

    @property
    def head(self) -> nn.Module:
        return self.tuner.vpdml_head[self.adapter]

    @property
    def proxy_bank(self) -> ProxyBank | None:
        return self.tuner.dml_proxies[self.adapter] if self.adapter in self.tuner.dml_proxies else None  # noqa: SIM401 (ModuleDict has no .get)

    @property
    def loss_settings(self) -> LossSettings:
        return self.config.loss_settings

    @property
    def host_resident_options(self) -> dict[str, bool]:
        return {name: bool(getattr(self.config, name)) for name in ("class_prompt_offload", "proxy_offload")}

    def dml_forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> DMLForwardOutput:
        return self.module.dml_forward(pixel_values, labels)

    @contextlib.contextmanager
    def zero_shot(self) -> Iterator[EmbedFn]:
        with self.module.disable_adapter():
            yield self.module.embed

    def describe(self) -> str:
        config = self.config
        if config.semantic_proxies == "gru":
            name = "VPTSP-G"
        elif config.semantic_proxies == "ema":
            name = "VPTSP-M"
        else:
            name = "VPT" if config.num_prompts else "Linear probe"
            return f"{name} + BitFit" if config.bitfit else name
        return name if config.bitfit else f"{name} (no BitFit)"

    def save(self, directory: Path, *, with_training_state: bool = True) -> None:
        # A ViT adapter holds no embedding layers; False also spares PEFT's Hub lookup of the base model's config
        # (a request per checkpoint for a Hub id or the offline backbone's portable name).
        self.module.save_pretrained(directory, save_embedding_layers=False)
        if with_training_state:
            save_training_state(self.module, directory)

    def load(self, directory: Path, *, with_training_state: bool = True) -> None:
        path = Path(directory) / ADAPTER_WEIGHTS_FILE
        state = load_safetensors_file(path)
        try:
            result = set_peft_model_state_dict(self.module, state, adapter_name=self.module.active_adapter)
        except (RuntimeError, ValueError) as error:  # a size mismatch or vpdml's tensor check: name the file
            raise ValueError(
                f"{path} does not fit this adapter (edited, or saved with another config?): {error}"
            ) from error
        adapter_keys = {key for key in result.missing_keys if ".vpdml_" in key or key.startswith("vpdml_")}
        if result.unexpected_keys or adapter_keys:
            raise ValueError(
                f"{path} does not match this adapter (unexpected keys {sorted(result.unexpected_keys)[:5]}, "
                f"missing {sorted(adapter_keys)[:5]}): was it saved with another method or config?"
            )
        if with_training_state and (Path(directory) / TRAINING_STATE_FILE).is_file():
            load_training_state(self.module, directory)

    def identity_content(
        self, adapter_name: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        adapter = adapter_name or self.module.active_adapter
        if adapter not in self.module.peft_config:
            raise ValueError(f"Unknown adapter {adapter!r} (adapters: {sorted(self.module.peft_config)}).")
        tensors = get_peft_model_state_dict(self.module, adapter_name=adapter, save_embedding_layers=False)
        return tensors, self.module.peft_config[adapter].to_dict()


class FullFineTuningDMLModel(DMLModel):
    """A :class:`~vpdml.FullFineTuningDML` (every backbone weight trains) or its :class:`~vpdml.LoRADML` kind (LoRA
    on the frozen backbone): a trainable backbone, a head and learnable proxies."""

    has_unused_parameters = True

    def __init__(self, module: FullFineTuningDML) -> None:
        super().__init__(module)

    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone

    @property
    def head(self) -> nn.Module:
        return self.module.head

    @property
    def proxy_bank(self) -> ProxyBank | None:
        return self.module.proxies

    @property
    def loss_settings(self) -> LossSettings:
        return self.module.loss_settings

    @property
    def host_resident_options(self) -> dict[str, bool]:
        return {"proxy_offload": bool(self.module.settings.get("proxy_offload"))}

    def dml_forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> DMLForwardOutput:
        return self.module.dml_forward(pixel_values, labels)

    @contextlib.contextmanager
    def zero_shot(self) -> Iterator[EmbedFn]:
        # the backbone as it is *now*: call this before training for the zero-shot baseline
        module = self.module

        def backbone_feature(pixel_values: torch.Tensor) -> torch.Tensor:
            features = pooled_features(
                module.backbone, module.backbone_info, pixel_values, module.settings["pooling"]
            )
            return F.normalize(features.float(), dim=-1)

        yield backbone_feature

    def describe(self) -> str:
        return self.module.describe()

    def save(self, directory: Path, *, with_training_state: bool = True) -> None:
        self.module.save_pretrained(directory)

    def load(self, directory: Path, *, with_training_state: bool = True) -> None:
        self.module.load_weights(directory)

    def identity_content(
        self, adapter_name: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.module.state_dict(), dict(self.module.settings)


def as_dml_model(model: nn.Module | DMLModel) -> DMLModel:
    """The :class:`DMLModel` view of a ``PeftModel`` with a vpdml adapter or a ``FullFineTuningDML``."""
    if isinstance(model, DMLModel):
        return model
    if isinstance(model, PeftModel):
        return PeftDMLModel(model)
    if isinstance(model, FullFineTuningDML):
        return FullFineTuningDMLModel(model)
    raise TypeError(
        f"Expected a PeftModel with a vpdml adapter or a vpdml.FullFineTuningDML, got {type(model).__name__}. "
        "Build one with vpdml.training.build_model(backbone, method, num_classes)."
    )
