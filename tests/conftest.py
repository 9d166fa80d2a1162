"""Shared fixtures: tiny backbones built from configs (no Hub access needed)."""

from __future__ import annotations

import pytest
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


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("single_thread")`): tiny models
    run several times faster (no thread contention) and reductions are summed in one fixed order, so exact-equality
    checks do not depend on the machine's core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 0, 3, 3])


def train_in_lockstep(models: dict, pixels: torch.Tensor, labels: torch.Tensor, steps: int = 3):
    """Train twin models side by side (RowSparseAdamW lr 0.01, weight decay 0.05, the same seed per step); yields
    each step's losses by name.

    For tests that compare two storages or code paths of the same model step for step.
    """
    from vpdml.row_sparse import RowSparseAdamW

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
