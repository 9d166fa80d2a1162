"""Semantic-proxy accumulators: how a class's state P_c absorbs the batch's semantic vectors (EMA or GRU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EMAAccumulator", "GRUAccumulator", "first_per_class", "scatter_mean"]


def scatter_mean(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` per distinct label; returns ``(classes, means)`` with ``classes`` sorted ascending."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = values.new_zeros(len(classes), values.shape[-1]).index_add(0, inverse, values)
    counts = torch.bincount(inverse, minlength=len(classes)).to(values.dtype).unsqueeze(-1)
    return classes, sums / counts


class EMAAccumulator(nn.Module):
    """``P_c <- normalise(lambda * P_c + (1 - lambda) * mean_i s_i)`` over the batch samples of class c."""

    def __init__(self, keep_ratio: float) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio

    def forward(
        self, state: torch.Tensor, semantic: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classes, means = scatter_mean(semantic, labels)
        updated = self.keep_ratio * _rows(state, classes, means) + (1.0 - self.keep_ratio) * means
        return classes, F.normalize(updated, dim=-1)


class GRUAccumulator(nn.Module):
    """The paper's GRU cell (ReLU candidate), stepped once per sample of a class, in batch order.

    z = sigmoid(W_z s + U_z P + b_z); r = sigmoid(W_r s + U_r P + b_r);
    n = ReLU(W_h s + r * (U_h P) + b_h); P <- (1 - z) * P + z * n; normalised after the class's steps.
    Classes are stepped in parallel: step k updates every class that has a k-th sample in the batch.
    """

    def __init__(self, dim: int, dropout: float = 0.0, init: str = "pytorch") -> None:
        super().__init__()
        self.input_proj = nn.Linear(dim, 3 * dim)  # W_z, W_r, W_h and the biases b
        self.state_proj = nn.Linear(dim, 3 * dim, bias=False)  # U_z, U_r, U_h
        self.dropout = nn.Dropout(dropout)
        if init == "xavier":
            self.reset_xavier()
        elif init != "pytorch":
            raise ValueError(f"GRUAccumulator init must be 'pytorch' or 'xavier', got {init!r}.")

    @torch.no_grad()
    def reset_xavier(self) -> None:
        """The official start: every D x D gate matrix xavier-uniform on its own (bound sqrt(3 / D), not the
        stacked (3D x D) matrix's sqrt(3 / 2D)), biases zero."""
        for weight in (self.input_proj.weight, self.state_proj.weight):
            for gate in weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(gate)
        nn.init.zeros_(self.input_proj.bias)

    def cell(self, semantic: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        w_z, w_r, w_h = self.input_proj(semantic).chunk(3, dim=-1)
        u_z, u_r, u_h = self.state_proj(state).chunk(3, dim=-1)
        z = torch.sigmoid(w_z + u_z)
        r = torch.sigmoid(w_r + u_r)
        candidate = torch.relu(w_h + r * u_h)
        return (1.0 - z) * state + z * candidate

    def forward(
        self, state: torch.Tensor, semantic: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classes, inverse = torch.unique(labels, return_inverse=True)
        rank = rank_within_class(inverse, len(classes))
        current = _rows(state, classes, semantic)
        for step in range(int(rank.max().item()) + 1):
            at_step = rank == step
            rows = inverse[at_step]
            stepped = self.cell(semantic[at_step], current[rows])
            current = current.index_put((rows,), stepped)
        return classes, F.normalize(self.dropout(current), dim=-1)


def _rows(state: torch.Tensor, classes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``state[classes]`` on ``like``'s device and dtype (the state may be kept in host memory)."""
    return state[classes.to(state.device)].to(like.device, like.dtype)


def rank_within_class(inverse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For each sample, how many earlier batch samples share its class (0 for the first)."""
    one_hot = F.one_hot(inverse, num_classes)
    return (one_hot.cumsum(0) * one_hot).sum(-1) - 1


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the first ``per_class`` batch images of every class (all images when None)."""
    if per_class is None:
        return torch.arange(labels.shape[0], device=labels.device)
    _, inverse = torch.unique(labels, return_inverse=True)
    rank = rank_within_class(inverse, int(inverse.max()) + 1)
    return torch.nonzero(rank < per_class, as_tuple=True)[0]
