"""Adapters saved by earlier vpdml versions keep loading, and embed exactly as they did.

``tests/fixtures/vptsp_g_v0_1`` was written by vpdml 0.1.0 before the package was regrouped into sub-packages
(``tests/fixtures/make_vptsp_g_v0_1.py``, run with that version): a tiny VPTSP-G adapter, its training state, and
the embeddings and loss it gave on fixed pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

import vpdml
from helpers.models import tiny_vit

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vptsp_g_v0_1"


def test_an_adapter_saved_before_the_restructure_embeds_bit_identically():
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    model = PeftModel.from_pretrained(tiny_vit(0), str(FIXTURE / "adapter")).eval()
    with torch.no_grad():
        embeddings = model.embed(expected["pixels"])
    assert torch.equal(embeddings, expected["embeddings"])


def test_its_training_state_loads_and_gives_the_same_loss():
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    model = PeftModel.from_pretrained(tiny_vit(0), str(FIXTURE / "adapter"), is_trainable=True).eval()
    vpdml.load_training_state(model, FIXTURE / "adapter")
    with torch.no_grad():
        loss = model.dml_loss(expected["pixels"], expected["labels"])
    torch.testing.assert_close(loss.reshape(1), expected["loss"], rtol=0, atol=1e-6)
