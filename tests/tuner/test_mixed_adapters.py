"""Mixed-adapter batches: `embed(pixel_values, adapter_names=[...])` equals embedding each group on its own."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from helpers.models import tiny_vit
from vpdml import VisualPromptDMLConfig


def _randomise(model) -> None:
    with torch.no_grad():  # fresh BitFit offsets are zero: make them matter
        for name, param in model.named_parameters():
            if "vpdml_bitfit" in name:
                param.normal_(std=0.1)


def _three_adapters(second_prompts: int = 4):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_vit(),
        VisualPromptDMLConfig(num_prompts=4, embedding_dim=8, semantic_proxies="none", bitfit=True),
    )
    model.add_adapter(
        "shoes",
        VisualPromptDMLConfig(
            num_prompts=second_prompts, embedding_dim=8, semantic_proxies="none", bitfit=True
        ),
    )
    model.add_adapter("birds", VisualPromptDMLConfig(num_prompts=4, embedding_dim=8, semantic_proxies="none"))
    _randomise(model)
    return model.eval()


@pytest.mark.parametrize("second_prompts", [4, 2], ids=["one-shared-pass", "pass-per-adapter"])
def test_mixed_batch_equals_per_adapter_embedding(second_prompts):
    model = _three_adapters(second_prompts)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names = ["shoes", "default", "birds", "shoes", "birds", "default"]
    mixed = model.embed(pixels, adapter_names=names)
    for name in ("default", "shoes", "birds"):
        rows = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        torch.testing.assert_close(mixed[rows], model.embed(pixels[rows]), atol=1e-5, rtol=1e-5)
    assert model.active_adapter == "birds"  # embed(adapter_names=...) does not switch the active adapter


def test_mixed_batch_errors():
    model = _three_adapters()
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="one adapter per image: got 3 names for 2 images"):
        model.embed(pixels, adapter_names=["default", "shoes", "birds"])
    with pytest.raises(ValueError, match="Unknown adapter 'cars'"):
        model.embed(pixels, adapter_names=["default", "cars"])
    with pytest.raises(ValueError, match="either adapter_name"):
        model.embed(pixels, adapter_name="default", adapter_names=["default", "shoes"])
    model.add_adapter("wide", VisualPromptDMLConfig(num_prompts=4, embedding_dim=16, semantic_proxies="none"))
    with pytest.raises(ValueError, match="different embedding_dim"):
        model.embed(pixels, adapter_names=["default", "wide"])
