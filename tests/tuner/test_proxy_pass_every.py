"""``proxy_pass_every=k``: the semantic-proxy pass runs on every k-th training step, the rhythm survives a resume."""

from __future__ import annotations

import torch
from peft import get_peft_model

import vpdml
from helpers.models import tiny_vit


def model(every: int):
    torch.manual_seed(0)
    config = vpdml.VisualPromptDMLConfig.for_method(
        "vptsp-g", num_prompts=2, class_prompts=2, num_classes=5, embedding_dim=16, proxy_pass_every=every
    )
    return get_peft_model(tiny_vit(0), config)


def test_the_proxy_pass_runs_on_every_kth_training_step_only(pixels, labels):
    peft_model = model(3).train()
    ran = [peft_model.dml_forward(pixels, labels).semantic_rows is not None for _ in range(7)]
    assert ran == [True, False, False, True, False, False, True]
    bank = peft_model.base_model.dml_proxies["default"]
    state = bank.semantic_state.clone()
    outputs = peft_model.dml_forward(pixels, labels)  # step 7: no pass, the stored state is left alone
    assert outputs.semantic_rows is None and torch.equal(bank.semantic_state, state)
    loss = peft_model.dml_loss(pixels, labels)  # step 8: scored against the stored state, still a loss
    assert torch.isfinite(loss) and loss.requires_grad


def test_eval_always_runs_it_and_keeps_the_clock(pixels, labels):
    peft_model = model(4).eval()
    bank = peft_model.base_model.dml_proxies["default"]
    assert all(peft_model.dml_forward(pixels, labels).semantic_rows is not None for _ in range(3))
    assert int(bank.proxy_pass_clock) == 0


def test_the_clock_is_training_state_and_every_1_adds_nothing(tmp_path, pixels, labels):
    peft_model = model(2).train()
    for _ in range(3):
        peft_model.dml_forward(pixels, labels)
    vpdml.save_training_state(peft_model, tmp_path)
    again = model(2)
    vpdml.load_training_state(again, tmp_path)
    assert int(again.base_model.dml_proxies["default"].proxy_pass_clock) == 3
    assert "proxy_pass_clock" not in model(1).base_model.dml_proxies["default"].state_dict()
