"""Full fine-tuning with the same head and Proxy-Anchor loss: the baseline adapters are compared against.

Not a PEFT adapter: every backbone weight trains and the whole model is saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpdml.atomic_io import atomic_save_safetensors, atomic_write_json, load_safetensors_file
from vpdml.modules.backbones import describe_backbone, pooled_features
from vpdml.modules.head import EmbeddingHead
from vpdml.proxies.bank import ProxyBank
from vpdml.proxies.loss import LossSettings, proxy_loss
from vpdml.tuner.outputs import DMLForwardOutput

HEAD_FILE = "dml_head.safetensors"
HEAD_CONFIG = "dml_head_config.json"
#: with semantic proxies (``LoRADML(semantic_proxies=...)``): class prompts, proxy head, GRU/EMA and semantic state
SEMANTIC_PROXIES_FILE = "dml_semantic_proxies.safetensors"


class FullFineTuningDML(nn.Module):
    """Backbone (trainable) -> pooled feature -> :class:`EmbeddingHead`; learnable proxies for the loss."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        embedding_dim: int | None = None,
        pooling: str = "cls",
        proxy_anchor_scale: float = 32.0,
        proxy_anchor_margin: float = 0.1,
        proxy_anchor_positive_average: str = "classes_with_positives",
        proxy_negatives: int | None = None,
        proxy_offload: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_info = describe_backbone(backbone)
        dim = embedding_dim or self.backbone_info.hidden_size
        self.settings = {
            "num_classes": num_classes,
            "embedding_dim": dim,
            "pooling": pooling,
            "proxy_anchor_scale": proxy_anchor_scale,
            "proxy_anchor_margin": proxy_anchor_margin,
            "proxy_anchor_positive_average": proxy_anchor_positive_average,
            "proxy_negatives": proxy_negatives,
            "proxy_offload": proxy_offload,
        }
        self.head = EmbeddingHead(self.backbone_info.hidden_size, dim)
        self.proxies = ProxyBank(
            num_classes=num_classes,
            embedding_dim=dim,
            hidden_size=self.backbone_info.hidden_size,
            semantic_proxies="none",
            class_prompt_counts=[],
            keep_ratio=0.0,
            gru_dropout=0.0,
            mix_alpha=1.0,
            negatives=proxy_negatives,
            offload=proxy_offload,
        )
        self.backbone.requires_grad_(True)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = pooled_features(self.backbone, self.backbone_info, pixel_values, self.settings["pooling"])
        return self.head(features)

    def dml_forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> DMLForwardOutput:
        """Embeddings of a training batch (and, where a subclass has them, this step's semantic-proxy rows)."""
        return DMLForwardOutput(self.embed(pixel_values))

    def dml_loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        outputs = self.dml_forward(pixel_values, labels)
        proxies = self.proxies.loss_proxies(labels, outputs.semantic_rows)
        return proxy_loss(outputs.embeddings, labels, proxies, self.loss_settings)

    @property
    def loss_settings(self) -> LossSettings:
        settings = self.settings
        return LossSettings(
            settings["proxy_anchor_scale"],
            settings["proxy_anchor_margin"],
            settings["proxy_anchor_positive_average"],
        )

    def describe(self) -> str:
        return "Full fine-tuning (Proxy Anchor)"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Backbone with ``save_pretrained`` under ``backbone/``, head and proxies as safetensors."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory / "backbone")
        self._save_head(directory)
        return directory

    def _save_head(self, directory: Path) -> None:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        proxies = {f"proxies.{k}": v for k, v in self.proxies.state_dict().items()}
        if self.proxies.uses_semantic_proxies:
            # semantic-proxy parts (class prompts, GRU, state) only resume training: a file of their own, so what
            # embedding needs stays small
            training_only = {k: v for k, v in proxies.items() if not k.startswith("proxies.learnable")}
            proxies = {k: v for k, v in proxies.items() if k not in training_only}
            atomic_save_safetensors(training_only, directory / SEMANTIC_PROXIES_FILE, {"format": "vpdml/1"})
        state.update(proxies)
        atomic_save_safetensors(state, directory / HEAD_FILE, {"format": "vpdml-full-finetune/1"})
        atomic_write_json(directory / HEAD_CONFIG, self.settings)

    def _load_head(self, directory: Path) -> None:
        state = load_safetensors_file(directory / HEAD_FILE)
        semantic_file = directory / SEMANTIC_PROXIES_FILE
        # without it (a copy made to embed only) the semantic parts keep their initial values: embedding does not
        # read them; checkpoints and run folders always have it, so a resume never loses them
        has_semantic = self.proxies.uses_semantic_proxies and semantic_file.is_file()
        if has_semantic:
            state.update(load_safetensors_file(semantic_file))
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        proxies = {k[8:]: v for k, v in state.items() if k.startswith("proxies.")}
        self.proxies.load_state_dict(proxies, strict=has_semantic or not self.proxies.uses_semantic_proxies)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load what :meth:`save_pretrained` wrote into this model, in place."""
        loaded = type(self).from_pretrained(directory)
        self.load_state_dict(loaded.state_dict(), strict=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FullFineTuningDML:
        from transformers import AutoModel

        directory = Path(directory)
        settings = read_settings(directory)
        model = cls(AutoModel.from_pretrained(directory / "backbone"), **settings)
        model._load_head(directory)
        return model


def read_settings(directory: Path) -> dict[str, Any]:
    """The constructor settings a full fine-tuning (or LoRA) folder was saved with, without its ``kind``."""
    settings = json.loads((Path(directory) / HEAD_CONFIG).read_text())
    settings.pop("kind", None)
    return settings


def saved_model_kind(directory: str | os.PathLike) -> str | None:
    """``"full-finetune"`` or ``"lora"`` for a folder written by those models' ``save_pretrained``, else None."""
    path = Path(directory) / HEAD_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("kind", "full-finetune")
