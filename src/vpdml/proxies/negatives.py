"""Sampled negative proxies: the batch's classes plus a uniform sample of the others, with unbiased weights."""

from __future__ import annotations

import torch

__all__ = ["sample_negative_classes"]


def sample_negative_classes(
    batch_classes: torch.Tensor, num_classes: int, draws: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's classes plus ``draws`` classes drawn uniformly, with replacement, from the other classes.

    Returns ``(classes, weights)``: the distinct sampled classes, sorted, and each one's weight in Proxy Anchor's
    negative term (1 for a batch class; ``count * (C - U) / draws`` for another class drawn ``count`` times, U the
    number of batch classes), so that the weighted sum is an unbiased estimate of the sum over all C classes.
    Returns None when ``draws`` covers the other classes anyway (then score every class: the exact loss).
    Costs O(draws log U), not O(C): the r-th class outside the batch is ``r + #{j : b_j - j <= r}`` for the
    sorted batch classes b.
    """
    batch_classes = torch.unique(batch_classes).cpu()
    others = num_classes - batch_classes.numel()
    if draws >= others:
        return None
    draws_ = torch.randint(others, (draws,), generator=generator)
    shifted = batch_classes - torch.arange(batch_classes.numel())
    drawn = draws_ + torch.searchsorted(shifted, draws_, right=True)
    classes, counts = torch.unique(torch.cat([batch_classes, drawn]), return_counts=True)
    in_batch = torch.isin(classes, batch_classes)
    weights = torch.where(in_batch, 1.0, counts.double() * (others / draws))
    return classes, weights.float()
