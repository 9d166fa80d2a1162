"""Tiny backbones built from configs (no Hub access) and small training helpers shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48}


def tiny_vit(seed: int = 0, **overrides) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(**{**TINY, "image_size": 32, "patch_size": 8, **overrides})
    return ViTModel(config).eval()


def tiny_backbone(kind: str, seed: int = 0) -> torch.nn.Module:
    """A few-layer random backbone of each supported family."""
    torch.manual_seed(seed)
    if kind == "vit":
        return tiny_vit(seed)
    if kind == "deit":
        return DeiTModel(DeiTConfig(**TINY, image_size=32, patch_size=8)).eval()
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**TINY, image_size=32, patch_size=8, mlp_ratio=2)).eval()
    if kind == "dinov2_with_registers":
        config = Dinov2WithRegistersConfig(
            **TINY, image_size=32, patch_size=8, mlp_ratio=2, num_register_tokens=2
        )
        return Dinov2WithRegistersModel(config).eval()
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=32, patch_size=8)).eval()
    raise ValueError(kind)


BACKBONE_KINDS = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip")


def assert_gradients_close(got: dict, expected: dict, *, atol_per_unit: float) -> None:
    """Same names, and each gradient within rtol 1e-4 and ``atol_per_unit`` times its largest entry (at least 1):
    float rounding grows with the gradient."""
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=atol_per_unit * scale, msg=name)


def train_in_lockstep(models: dict, pixels: torch.Tensor, labels: torch.Tensor, steps: int = 3):
    """Train twin models side by side (RowSparseAdamW lr 0.01, weight decay 0.05, the same seed per step); yields
    each step's losses by name.

    For tests that compare two storages or code paths of the same model step for step.
    """
    from vpdml.modules.row_sparse import RowSparseAdamW

    optimizers = {
        name: RowSparseAdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.05)
        for name, model in models.items()
    }
    for step in range(steps):
        losses = {}
        for name, model in models.items():
            model.train()
            torch.manual_seed(step)
            optimizers[name].zero_grad()
            loss = model.dml_loss(pixels, labels)
            loss.backward()
            optimizers[name].step()
            losses[name] = loss.item()
        yield losses
