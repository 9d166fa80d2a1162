"""Full fine-tuning with the same head and Proxy-Anchor loss: the baseline adapters are compared against.

Not a PEFT adapter: every backbone weight trains and the whole model is saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .architectures import describe_backbone, pooled_features
from .atomic_io import atomic_save_safetensors
from .heads import EmbeddingHead
from .losses import proxy_anchor_loss
from .proxies import ProxyBank

_HEAD_FILE = "dml_head.safetensors"
_HEAD_CONFIG = "dml_head_config.json"


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

    def dml_loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        proxies = self.proxies.loss_proxies(labels)
        return proxy_anchor_loss(
            self.embed(pixel_values),
            labels,
            proxies.proxies,
            scale=self.settings["proxy_anchor_scale"],
            margin=self.settings["proxy_anchor_margin"],
            positive_average=self.settings["proxy_anchor_positive_average"],
            **proxies.loss_kwargs(),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Backbone with ``save_pretrained`` under ``backbone/``, head and proxies as safetensors."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory / "backbone")
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        state.update({f"proxies.{k}": v for k, v in self.proxies.state_dict().items()})
        atomic_save_safetensors(state, directory / _HEAD_FILE, {"format": "vpdml-full-finetune/1"})
        (directory / _HEAD_CONFIG).write_text(json.dumps(self.settings, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FullFineTuningDML:
        from transformers import AutoModel

        directory = Path(directory)
        settings = json.loads((directory / _HEAD_CONFIG).read_text())
        model = cls(AutoModel.from_pretrained(directory / "backbone"), **settings)
        state = load_file(str(directory / _HEAD_FILE))
        model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        model.proxies.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("proxies.")})
        return model
