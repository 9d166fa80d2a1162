"""PEFT's LoRA on the backbone, trained with vpdml's head, proxies, Proxy-Anchor loss and loop.

The baseline a user could pick instead of prompts: low-rank updates of the attention projections. The LoRA weights
are saved the PEFT way (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(backbone, folder)``); the head and proxies go next to them as for full fine-tuning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from vpdml.atomic_io import atomic_save_safetensors, load_safetensors_file
from vpdml.models.full_finetune import FullFineTuningDML, read_settings
from vpdml.modules.backbones import pooled_features
from vpdml.proxies.accumulators import first_per_class
from vpdml.tuner.bank import proxy_bank_for, proxy_token_subset
from vpdml.tuner.config import VisualPromptDMLConfig
from vpdml.tuner.layer import PromptRouter, SharedTrunk, prompted_blocks
from vpdml.tuner.outputs import DMLForwardOutput

LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's key prefix in ``adapter_model.safetensors``: the ``PeftModel`` wraps the backbone as ``base_model.model``
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


class LoRADML(FullFineTuningDML):
    """Frozen backbone with LoRA on ``lora_target_modules`` (default: the attention's query and value
    projections) -> pooled feature -> head; learnable proxies."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: Sequence[str] | None = None,
        semantic_proxies: str = "none",
        class_prompts: int = 1,
        proxy_pass_layers: int | None = 2,
        semantic_images_per_class: int | None = 1,
        proxy_mix_alpha: float = 0.5,
        proxy_pass_tokens: float | None = None,
        **settings: Any,
    ) -> None:
        lora_target_modules = list(lora_target_modules or query_value_projections(backbone))
        if int(lora_rank) < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
        lora_config = LoraConfig(
            r=int(lora_rank),
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(lora_target_modules),
            base_model_name_or_path=getattr(backbone, "name_or_path", None) or None,
        )
        try:
            inject_adapter_in_model(lora_config, backbone, adapter_name=_ADAPTER)
        except ValueError as error:  # PEFT: no module matched target_modules
            raise ValueError(
                f"LoRA found none of {lora_target_modules} in {type(backbone).__name__}: pass lora_target_modules "
                f"naming its attention projections (e.g. {query_value_projections(backbone)}). PEFT said: {error}"
            ) from error
        super().__init__(backbone, num_classes=num_classes, **settings)
        self.lora_config = lora_config
        for name, param in self.backbone.named_parameters():
            param.requires_grad = "lora_" in name
        self.settings.update(
            kind="lora",
            lora_rank=int(lora_rank),
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target_modules=list(lora_target_modules),
        )
        self.semantic_config: VisualPromptDMLConfig | None = None
        if semantic_proxies != "none":
            semantic = {
                "semantic_proxies": semantic_proxies,
                "class_prompts": class_prompts,
                "proxy_pass_layers": proxy_pass_layers,
                "semantic_images_per_class": semantic_images_per_class,
                "proxy_mix_alpha": proxy_mix_alpha,
            }
            if proxy_pass_tokens is not None:  # only then: earlier folders' settings stay as they were
                semantic["proxy_pass_tokens"] = proxy_pass_tokens
            self._add_semantic_proxies(semantic)
            self.settings.update(semantic)  # only then: a plain LoRA folder's settings stay as they were

    def _add_semantic_proxies(self, semantic: dict[str, Any]) -> None:
        """Replace the learnable proxies by a VPTSP proxy bank: class prompts in the (LoRA-adapted) backbone's last
        ``proxy_pass_layers`` blocks generate semantic proxies, exactly as in the prompt tuner."""
        self.semantic_config = VisualPromptDMLConfig(
            num_prompts=0,
            num_classes=self.settings["num_classes"],
            embedding_dim=self.settings["embedding_dim"],
            proxy_negatives=self.settings["proxy_negatives"],
            proxy_offload=self.settings["proxy_offload"],
            **semantic,
        )
        info = self.backbone_info
        self.proxies = proxy_bank_for(
            self.semantic_config,
            embedding_dim=self.settings["embedding_dim"],
            hidden_size=info.hidden_size,
            num_layers=info.num_layers,
        )
        self._router = PromptRouter()

    def dml_forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> DMLForwardOutput:
        """Embeddings; with semantic proxies also a proxy pass (class prompts routed through the backbone's blocks,
        from the sample pass's hidden states after its shared trunk) and this step's semantic-proxy rows."""
        bank, config = self.proxies, self.semantic_config
        if config is None or not bank.proxy_pass_due():
            return DMLForwardOutput(self.embed(pixel_values))
        labels = labels.long()
        info = self.backbone_info
        chosen = first_per_class(labels, config.semantic_images_per_class)
        per_layer = bank.class_prompts.gather(labels[chosen])
        trunk_layers = config.shared_trunk_layers(info.num_layers)
        trunk = SharedTrunk(trunk_layers) if trunk_layers else None
        router = self._router
        with prompted_blocks(self.backbone.get_submodule(info.blocks_path), router):
            with router.sharing(trunk):
                embeddings = self.embed(pixel_values)
            if trunk is not None:
                trunk.select(chosen)

            def class_prompts(layer_index: int, batch_size: int) -> torch.Tensor | None:
                return per_layer[layer_index]

            subset = proxy_token_subset(config, info)
            with router.providing(class_prompts), router.sharing(trunk), router.subsetting(subset):
                features = pooled_features(
                    self.backbone, info, pixel_values[chosen], self.settings["pooling"]
                )
        semantic = bank.proxy_head(features)
        return DMLForwardOutput(embeddings, semantic, bank.accumulate(semantic, labels[chosen]))

    def describe(self) -> str:
        if self.semantic_config is not None:
            return f"LoRA r={self.lora_config.r} + semantic proxies ({self.semantic_config.semantic_proxies.upper()})"
        return f"LoRA r={self.lora_config.r} (Proxy Anchor)"

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights under PEFT's file keys (``base_model.model.<module>.lora_A.weight``)."""
        return {
            _PEFT_PREFIX + key.replace(f".{_ADAPTER}.", "."): value.detach()
            for key, value in self.backbone.state_dict().items()
            if "lora_" in key
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """PEFT's LoRA adapter files, plus the head and proxies (``dml_head.safetensors``; with semantic proxies,
        their training-only parts in ``dml_semantic_proxies.safetensors``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lora_config.save_pretrained(str(directory))
        atomic_save_safetensors(self.lora_state_dict(), directory / LORA_WEIGHTS_FILE, {"format": "pt"})
        self._save_head(directory)
        return directory

    def load_weights(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self._load_lora(directory)
        self._load_head(directory)

    def _load_lora(self, directory: Path) -> None:
        saved = load_safetensors_file(directory / LORA_WEIGHTS_FILE)
        expected = self.lora_state_dict()
        if set(saved) != set(expected):
            missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ValueError(
                f"{directory / LORA_WEIGHTS_FILE} does not match this LoRA model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): was it saved with another rank or target modules?"
            )
        own = {
            key[len(_PEFT_PREFIX) :]
            .replace(".lora_A.", f".lora_A.{_ADAPTER}.")
            .replace(".lora_B.", f".lora_B.{_ADAPTER}."): value
            for key, value in saved.items()
        }
        result = self.backbone.load_state_dict(own, strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"{directory / LORA_WEIGHTS_FILE}: unexpected keys {result.unexpected_keys[:3]}."
            )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, backbone: nn.Module) -> LoRADML:
        """Rebuild a saved LoRA model on ``backbone`` (the frozen model it was trained on, see
        :func:`saved_base_model`)."""
        directory = Path(directory)
        model = cls(backbone, **read_settings(directory))
        model.load_weights(directory)
        return model


def saved_base_model(directory: str | os.PathLike) -> str | None:
    """The ``base_model_name_or_path`` a saved LoRA adapter names."""
    return LoraConfig.from_pretrained(str(directory)).base_model_name_or_path or None


def query_value_projections(backbone: nn.Module) -> list[str]:
    """The attention query and value projections' module names (LoRA's usual targets): ``q_proj``/``v_proj``
    (CLIP, and ViT/DINOv2 in transformers >= 5) or ``query``/``value`` (ViT/DINOv2 in transformers 4)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    return ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= leaves else ["query", "value"]
