"""How the semantic branch starts and mixes: each option against its documented formula (docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpdml.modules.head import EmbeddingHead
from vpdml.proxies.bank import ProxyBank, init_learnable_proxies

CLASSES, DIM = 6, 4


def bank(**options) -> ProxyBank:
    torch.manual_seed(0)
    settings = {"semantic_proxies": "ema", "keep_ratio": 0.8, "mix_alpha": 0.3, **options}
    return ProxyBank(
        num_classes=CLASSES,
        embedding_dim=DIM,
        hidden_size=8,
        class_prompt_counts=[1, 1],
        gru_dropout=0.0,
        **settings,
    )


@pytest.mark.parametrize(
    ("kind", "expected_norm"),
    [("kaiming", lambda c, e: math.sqrt(2 * e / c)), ("small", lambda c, e: math.sqrt(2 * e / (c + e)) / 8)],
)
def test_learnable_proxy_init_has_the_documented_row_norm(kind, expected_norm):
    torch.manual_seed(0)
    classes, dim = 2000, 384
    proxies = init_learnable_proxies(torch.empty(classes, dim), kind)
    mean_norm = proxies.norm(dim=-1).pow(2).mean().sqrt().item()
    assert mean_norm == pytest.approx(expected_norm(classes, dim), rel=0.01)


def test_unknown_learnable_init_is_refused():
    with pytest.raises(ValueError, match="'kaiming' or 'small'"):
        init_learnable_proxies(torch.empty(2, 2), "zeros")


def test_raw_mix_uses_o_as_it_is_and_normalized_mix_uses_its_direction():
    raw, normalized = bank(mix="raw"), bank(mix="normalized")
    with torch.no_grad():
        raw.learnable.mul_(5.0)
        normalized.learnable.copy_(raw.learnable)
    state, learnable = raw.semantic_state, raw.learnable.detach()
    expected_raw = F.normalize(0.7 * state + 0.3 * learnable, dim=-1)
    expected_normalized = F.normalize(0.7 * state + 0.3 * F.normalize(learnable, dim=-1), dim=-1)
    torch.testing.assert_close(raw.mixed_proxies().detach(), expected_raw)
    torch.testing.assert_close(normalized.mixed_proxies().detach(), expected_normalized)


def test_unseen_classes_use_the_learnable_proxy_alone_until_their_state_is_updated():
    proxies = bank(unseen="learnable", mix="normalized")
    learnable = F.normalize(proxies.learnable.detach(), dim=-1)
    torch.testing.assert_close(proxies.mixed_proxies().detach(), learnable)  # nothing seen yet
    proxies.train()
    semantic = F.normalize(torch.randn(3, DIM), dim=-1)
    proxies.accumulate(semantic, torch.tensor([1, 1, 4]))
    assert proxies.semantic_seen.tolist() == [False, True, False, False, True, False]
    mixed = proxies.mixed_proxies().detach()
    seen = torch.tensor([1, 4])
    expected_seen = F.normalize(0.7 * proxies.semantic_state[seen] + 0.3 * learnable[seen], dim=-1)
    torch.testing.assert_close(mixed[seen], expected_seen)
    unseen = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(mixed[unseen], learnable[unseen])


def test_the_sampled_path_applies_the_same_mask():
    exact = bank(unseen="learnable", mix="normalized")
    sampled = bank(unseen="learnable", mix="normalized", negatives=100)  # covers every class: the exact loss
    sampled.load_state_dict(exact.state_dict(), strict=False)  # the sample counter is its own
    labels = torch.tensor([1, 1, 4, 4])
    for proxies in (exact, sampled):
        proxies.train()
        proxies.accumulate(F.normalize(torch.ones(2, DIM), dim=-1), torch.tensor([1, 4]))
    torch.testing.assert_close(exact.loss_proxies(labels).proxies, sampled.loss_proxies(labels).proxies)


def test_first_pass_starts_a_new_class_from_its_semantic_vectors():
    proxies = bank(semantic_init="first_pass")
    proxies.train()
    semantic = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    labels = torch.tensor([2, 2, 5])
    proxies.accumulate(semantic, labels)
    # EMA from a state equal to the normalised mean gives that direction back, whatever the keep ratio
    torch.testing.assert_close(
        proxies.semantic_state[2], F.normalize(torch.tensor([0.5, 0.5, 0.0, 0.0]), dim=0)
    )
    torch.testing.assert_close(proxies.semantic_state[5], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # a class already seen is updated as usual, not restarted
    before = proxies.semantic_state[2].clone()
    proxies.accumulate(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([2]))
    expected = F.normalize(0.8 * before + 0.2 * torch.tensor([0.0, 0.0, 0.0, 1.0]), dim=0)
    torch.testing.assert_close(proxies.semantic_state[2], expected)


def test_eval_mode_neither_starts_nor_marks_a_class():
    proxies = bank(semantic_init="first_pass", unseen="learnable")
    proxies.eval()
    before = proxies.semantic_state.clone()
    proxies.accumulate(torch.ones(2, DIM), torch.tensor([0, 3]))
    assert torch.equal(proxies.semantic_state, before)
    assert not proxies.semantic_seen.any()


def test_data_start_copies_the_head_and_sets_class_means():
    proxies = bank(semantic_init="class_means", proxy_head_init="embedding_head")
    assert proxies.needs_data_init
    torch.manual_seed(3)
    head = EmbeddingHead(8, DIM)
    features = torch.randn(9, 8)
    labels = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3])
    proxies.initialize_from_data(head, features, labels)
    for name, tensor in head.state_dict().items():
        assert torch.equal(proxies.proxy_head.state_dict()[name], tensor)
    outputs = head(features).detach()
    for label in (0, 2, 3):
        expected = F.normalize(outputs[labels == label].mean(dim=0), dim=0)
        torch.testing.assert_close(proxies.semantic_state[label], expected)
    assert proxies.semantic_seen.tolist() == [True, False, True, True, False, False]


def test_defaults_need_no_data_start():
    assert not bank().needs_data_init
    assert bank(proxy_head_init="embedding_head").needs_data_init
