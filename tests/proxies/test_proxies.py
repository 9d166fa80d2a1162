"""Semantic-proxy accumulation: EMA and GRU updates against their equations on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpdml.proxies.accumulators import EMAAccumulator, GRUAccumulator
from vpdml.proxies.bank import ProxyBank
from vpdml.proxies.class_prompts import ClassPromptTable


def test_ema_update_matches_the_equation():
    state = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    semantic = torch.tensor([[0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 2])
    classes, rows = EMAAccumulator(keep_ratio=0.8)(state, semantic, labels)
    assert classes.tolist() == [0, 2]
    expected0 = F.normalize(0.8 * state[0] + 0.2 * torch.tensor([0.0, 2.0]), dim=-1)
    expected2 = F.normalize(0.8 * state[2] + 0.2 * torch.tensor([1.0, 0.0]), dim=-1)
    torch.testing.assert_close(rows, torch.stack([expected0, expected2]))


def _gru_by_hand(gru: GRUAccumulator, s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    dim = p.shape[-1]
    w, b, u = gru.input_proj.weight, gru.input_proj.bias, gru.state_proj.weight
    w_z, w_r, w_h = w[:dim], w[dim : 2 * dim], w[2 * dim :]
    b_z, b_r, b_h = b[:dim], b[dim : 2 * dim], b[2 * dim :]
    u_z, u_r, u_h = u[:dim], u[dim : 2 * dim], u[2 * dim :]
    z = torch.sigmoid(w_z @ s + u_z @ p + b_z)
    r = torch.sigmoid(w_r @ s + u_r @ p + b_r)
    n = torch.relu(w_h @ s + r * (u_h @ p) + b_h)
    return (1 - z) * p + z * n


def test_gru_steps_once_per_sample_in_order_then_normalises():
    torch.manual_seed(0)
    gru = GRUAccumulator(dim=4)
    state = F.normalize(torch.randn(5, 4), dim=-1)
    semantic = torch.randn(5, 4)
    labels = torch.tensor([3, 1, 3, 3, 1])  # class 3: samples 0, 2, 3 in order; class 1: samples 1, 4
    classes, rows = gru(state, semantic, labels)
    assert classes.tolist() == [1, 3]
    p1 = _gru_by_hand(gru, semantic[4], _gru_by_hand(gru, semantic[1], state[1]))
    p3 = state[3]
    for i in (0, 2, 3):
        p3 = _gru_by_hand(gru, semantic[i], p3)
    torch.testing.assert_close(rows, F.normalize(torch.stack([p1, p3]), dim=-1))


def test_bank_stores_detached_rows_and_mixes_with_learnable_proxies():
    torch.manual_seed(0)
    bank = ProxyBank(
        num_classes=4,
        embedding_dim=3,
        hidden_size=8,
        semantic_proxies="ema",
        class_prompt_counts=[2, 1],
        keep_ratio=0.5,
        gru_dropout=0.0,
        mix_alpha=0.25,
    ).train()
    before = bank.semantic_state.clone()
    semantic = torch.randn(2, 3, requires_grad=True)
    classes, rows = bank.accumulate(semantic, torch.tensor([2, 2]))
    assert classes.tolist() == [2]
    torch.testing.assert_close(bank.semantic_state[2], rows[0].detach())
    torch.testing.assert_close(bank.semantic_state[[0, 1, 3]], before[[0, 1, 3]])
    mixed = bank.mixed_proxies((classes, rows))
    expected = F.normalize(0.75 * bank.semantic_state + 0.25 * bank.learnable.detach(), dim=-1)
    torch.testing.assert_close(mixed.detach(), expected)
    mixed[2].sum().backward()
    assert semantic.grad is not None and semantic.grad.abs().sum() > 0
    bank.eval()
    bank.accumulate(torch.randn(1, 3), torch.tensor([0]))
    torch.testing.assert_close(bank.semantic_state[0], before[0])  # eval never moves the state


def test_class_prompt_table_gathers_per_layer_slices():
    table = ClassPromptTable(num_classes=3, counts=[2, 0, 1], hidden_size=4)
    per_layer = table.gather(torch.tensor([2, 0]))
    assert per_layer[1] is None
    torch.testing.assert_close(per_layer[0], table.weight[[2, 0], :2])
    torch.testing.assert_close(per_layer[2], table.weight[[2, 0], 2:3])


def test_gru_official_start_is_xavier_per_gate_with_zero_biases():
    torch.manual_seed(0)
    dim = 256
    official, default = GRUAccumulator(dim, init="xavier"), GRUAccumulator(dim)
    for weight in (official.input_proj.weight, official.state_proj.weight):
        for gate in weight.chunk(
            3, dim=0
        ):  # xavier on a D x D gate: U(-sqrt(3 / D), sqrt(3 / D)), variance 1 / D
            assert gate.abs().max() <= math.sqrt(3 / dim)
            assert gate.var().item() == pytest.approx(1 / dim, rel=0.05)
    assert torch.count_nonzero(official.input_proj.bias) == 0
    # nn.Linear's default: U(-1 / sqrt(D), 1 / sqrt(D)), variance 1 / (3 D), random biases
    assert default.input_proj.weight.var().item() == pytest.approx(1 / (3 * dim), rel=0.05)
    assert torch.count_nonzero(default.input_proj.bias) == 3 * dim
    with pytest.raises(ValueError, match="'pytorch' or 'xavier'"):
        GRUAccumulator(dim, init="orthogonal")


def test_config_gru_init_reaches_the_accumulator_and_is_checked():
    from vpdml.tuner.bank import proxy_bank_for
    from vpdml.tuner.config import VisualPromptDMLConfig

    config = VisualPromptDMLConfig(num_classes=3, gru_init="xavier", class_prompts=1)
    bank = proxy_bank_for(config, embedding_dim=8, hidden_size=8, num_layers=2)
    assert torch.count_nonzero(bank.accumulator.input_proj.bias) == 0
    with pytest.raises(ValueError, match="gru_init"):
        VisualPromptDMLConfig(num_classes=3, gru_init="glorot")
