"""Proxy Anchor against pytorch-metric-learning, and the official code's averaging option."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss as PMLProxyAnchor

from vpdml import ProxyAnchorLoss, proxy_anchor_loss


def _pml_loss(embeddings, labels, proxies, scale, margin):
    reference = PMLProxyAnchor(
        num_classes=proxies.shape[0], embedding_size=proxies.shape[1], margin=margin, alpha=scale
    )
    with torch.no_grad():
        reference.proxies.copy_(proxies)
    return reference(embeddings, labels)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("scale", "margin"), [(32.0, 0.1), (16.0, 0.2)])
def test_equals_pytorch_metric_learning(seed, scale, margin):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 6, (12,), generator=generator)  # some classes absent from the batch
    proxies = torch.randn(9, 8, generator=generator, dtype=torch.float64)
    ours = proxy_anchor_loss(embeddings, labels, proxies, scale=scale, margin=margin)
    theirs = _pml_loss(embeddings.float(), labels, proxies.float(), scale, margin)
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_gradients_equal_pytorch_metric_learning():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(10, 6, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    proxies = torch.randn(7, 6, generator=generator)
    proxy_anchor_loss(embeddings, labels, proxies).backward()
    ours = embeddings.grad.clone()
    embeddings.grad = None
    _pml_loss(embeddings, labels, proxies, 32.0, 0.1).backward()
    torch.testing.assert_close(ours, embeddings.grad, atol=1e-5, rtol=1e-4)


def test_all_classes_averaging_divides_the_positive_term_by_every_proxy():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(4, 5, generator=generator)
    labels = torch.tensor([0, 0, 1, 1])
    proxies = torch.randn(10, 5, generator=generator)
    published = proxy_anchor_loss(embeddings, labels, proxies, margin=0.0, scale=1.0)
    official = proxy_anchor_loss(
        embeddings, labels, proxies, margin=0.0, scale=1.0, positive_average="all_classes"
    )
    # pos/2 + neg vs pos/10 + neg: the difference is pos * (1/2 - 1/10)
    cos = torch.nn.functional.normalize(embeddings, dim=-1) @ torch.nn.functional.normalize(proxies, dim=-1).T
    pos = sum(torch.log1p(torch.exp(-cos[labels == c, c]).sum()) for c in (0, 1))
    torch.testing.assert_close(published - official, pos * (1 / 2 - 1 / 10))


def test_module_form_and_errors():
    loss = ProxyAnchorLoss(scale=32, margin=0.1)
    embeddings, proxies = torch.randn(4, 3), torch.randn(5, 3)
    assert loss(embeddings, torch.tensor([0, 1, 2, 3]), proxies).shape == ()
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 4\]"):
        loss(embeddings, torch.tensor([0, 1, 2, 5]), proxies)
    with pytest.raises(ValueError, match=r"embeddings \(B, E\) and proxies \(C, E\)"):
        loss(embeddings, torch.tensor([0, 1, 2, 3]), torch.randn(5, 4))
    with pytest.raises(ValueError, match="positive_average"):
        proxy_anchor_loss(embeddings, torch.tensor([0, 1, 2, 3]), proxies, positive_average="mean")
