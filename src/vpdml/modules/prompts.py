"""Shared VPT-deep visual prompts: fresh learnable tokens for every prompted layer."""

from __future__ import annotations

import math

import torch
from torch import nn


def prompt_schedule(num_prompts: int, step: int, depth: int | None, num_layers: int) -> list[int]:
    """Prompt count per layer: ``max(N - step * i, 0)`` for the first ``depth`` layers, 0 after.

    >>> prompt_schedule(10, 2, None, 6)
    [10, 8, 6, 4, 2, 0]
    """
    depth = num_layers if depth is None else min(depth, num_layers)
    return [max(num_prompts - step * i, 0) if i < depth else 0 for i in range(num_layers)]


def xavier_normal_prompts(*shape: int) -> torch.Tensor:
    """Xavier-normal init over the last two dims (tokens, hidden), as in VPT and VPTSP."""
    tokens, hidden = shape[-2], shape[-1]
    std = math.sqrt(2.0 / (tokens + hidden)) if tokens + hidden > 0 else 0.0
    return torch.randn(*shape) * std


class VisualPrompts(nn.Module):
    """One ``(n_i, D)`` parameter per prompted layer; layers with 0 prompts hold nothing.

    Parameters are named by layer index (``layer_3``) so saved keys do not depend on where the backbone
    keeps its blocks.
    """

    def __init__(self, counts: list[int], hidden_size: int) -> None:
        super().__init__()
        self.counts = list(counts)
        self.hidden_size = hidden_size
        self.prompts = nn.ParameterDict(
            {
                f"layer_{i}": nn.Parameter(xavier_normal_prompts(n, hidden_size))
                for i, n in enumerate(counts)
                if n
            }
        )

    @torch.no_grad()
    def center_on(self, token_means: torch.Tensor) -> None:
        """``p_j <- token_means[i] + (p_j - mean_k p_k)`` in every layer ``i`` (``token_means``: ``(layers, D)``).
        One prompt becomes the mean token itself; several keep their differences (their random draw), so they do
        not start as identical tokens that would get identical gradients forever."""
        expected = (len(self.counts), self.hidden_size)
        if tuple(token_means.shape) != expected:
            raise ValueError(
                f"token_means must be (num_layers, hidden_size) = {expected}, got {tuple(token_means.shape)}."
            )
        for index in range(len(self.counts)):
            layer = self.for_layer(index)
            if layer is not None:
                layer.copy_(layer - layer.mean(dim=0, keepdim=True) + token_means[index].to(layer))

    def for_layer(self, layer_index: int) -> torch.Tensor | None:
        """The ``(n, D)`` prompts of a layer, or None when it has none."""
        key = f"layer_{layer_index}"
        return self.prompts.get(key, None)
