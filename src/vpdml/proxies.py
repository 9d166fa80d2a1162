"""Proxies for the Proxy-Anchor loss: learnable proxies, class prompts and semantic-proxy accumulation.

VPTSP (DESIGN.md section 1, items 4-6): each class c owns class prompts q_c. A second pass of the frozen
backbone where every image gets the class prompts of its own label gives, through a proxy head, one
"semantic" vector s_i per image. A per-class state P_c (a buffer) accumulates those vectors across batches
by EMA or a GRU; the loss uses Q_c = normalise((1 - alpha) * P_c + alpha * O_c) with learnable proxies O.

Everything here is training-only: none of it is needed to embed images.

The class prompts are stored by :mod:`vpdml.class_prompt_tables` (dense, row-sparse or low-rank). The learnable
proxies O and the state P stay dense ``(C, E)`` tensors on purpose: Proxy Anchor's negative term compares every
sample with every proxy, so each step reads every row of P and gives every row of O a non-zero gradient. A
row-sparse O would only pay off with sampled negatives, which is a different loss (docs/scale.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .class_prompt_tables import ClassPromptTable, build_class_prompt_table
from .heads import EmbeddingHead

__all__ = [
    "ClassPromptTable",
    "EMAAccumulator",
    "GRUAccumulator",
    "ProxyBank",
    "scatter_mean",
]


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
        updated = self.keep_ratio * state[classes].to(means.dtype) + (1.0 - self.keep_ratio) * means
        return classes, F.normalize(updated, dim=-1)


class GRUAccumulator(nn.Module):
    """The paper's GRU cell (ReLU candidate), stepped once per sample of a class, in batch order.

    z = sigmoid(W_z s + U_z P + b_z); r = sigmoid(W_r s + U_r P + b_r);
    n = ReLU(W_h s + r * (U_h P) + b_h); P <- (1 - z) * P + z * n; normalised after the class's steps.
    Classes are stepped in parallel: step k updates every class that has a k-th sample in the batch.
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_proj = nn.Linear(dim, 3 * dim)  # W_z, W_r, W_h and the biases b
        self.state_proj = nn.Linear(dim, 3 * dim, bias=False)  # U_z, U_r, U_h
        self.dropout = nn.Dropout(dropout)

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
        rank = _rank_within_class(inverse, len(classes))
        current = state[classes].to(semantic.dtype)
        for step in range(int(rank.max().item()) + 1):
            at_step = rank == step
            rows = inverse[at_step]
            stepped = self.cell(semantic[at_step], current[rows])
            current = current.index_put((rows,), stepped)
        return classes, F.normalize(self.dropout(current), dim=-1)


def _rank_within_class(inverse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For each sample, how many earlier batch samples share its class (0 for the first)."""
    one_hot = F.one_hot(inverse, num_classes)
    return (one_hot.cumsum(0) * one_hot).sum(-1) - 1


class ProxyBank(nn.Module):
    """The training-only half of an adapter: learnable proxies, and (VPTSP) class prompts, a proxy head,
    the accumulator and the per-class semantic-proxy state."""

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        hidden_size: int,
        semantic_proxies: str,
        class_prompt_counts: list[int],
        keep_ratio: float,
        gru_dropout: float,
        mix_alpha: float,
        class_prompt_storage: str = "dense",
        class_prompt_rank: int = 64,
        class_prompt_offload: bool = False,
    ) -> None:
        super().__init__()
        self.semantic_kind = semantic_proxies
        self.mix_alpha = mix_alpha
        self.learnable = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.learnable, mode="fan_out")  # as in Proxy Anchor
        if semantic_proxies == "none":
            return
        self.class_prompts = build_class_prompt_table(
            class_prompt_storage,
            num_classes=num_classes,
            counts=class_prompt_counts,
            hidden_size=hidden_size,
            rank=class_prompt_rank,
            offload=class_prompt_offload,
        )
        self.proxy_head = EmbeddingHead(hidden_size, embedding_dim)
        self.accumulator: nn.Module = (
            GRUAccumulator(embedding_dim, gru_dropout)
            if semantic_proxies == "gru"
            else EMAAccumulator(keep_ratio)
        )
        self.register_buffer("semantic_state", F.normalize(torch.randn(num_classes, embedding_dim), dim=-1))

    @property
    def num_classes(self) -> int:
        return self.learnable.shape[0]

    @property
    def uses_semantic_proxies(self) -> bool:
        return self.semantic_kind != "none"

    def mixed_proxies(self, semantic_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``Q = normalise((1 - alpha) * P + alpha * O)``, with this batch's updated rows of P (with their graph)
        where given and the stored state elsewhere; plain ``normalise(O)`` without semantic proxies."""
        if not self.uses_semantic_proxies:
            return F.normalize(self.learnable, dim=-1)
        # Every proxy enters Proxy Anchor's negative term, so Q is (C, E) whatever the batch: build it with one
        # (C, E) temporary (lerp(P, O, a) = (1 - a) P + a O, whose backward saves nothing) plus the normalised
        # output, then overwrite the batch's rows in place, instead of a copy per arithmetic step.
        state = self.semantic_state.detach().to(self.learnable.dtype)
        mixed = torch.lerp(state, self.learnable, self.mix_alpha)
        if semantic_rows is not None:
            classes, rows = semantic_rows
            batch = torch.lerp(rows.to(mixed.dtype), self.learnable[classes], self.mix_alpha)
            mixed = mixed.index_put_((classes,), batch)
        return F.normalize(mixed, dim=-1)

    def accumulate(self, semantic: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the state rows of the batch's classes from their semantic vectors; returns the new rows with
        their graph (for this step's loss) and stores them detached (for later steps)."""
        # The accumulators read (and cast) only the batch's rows: no (C, E) copy of the state per step.
        classes, rows = self.accumulator(self.semantic_state, semantic, labels)
        if self.training:
            self.semantic_state[classes] = rows.detach().to(self.semantic_state.dtype)
        return classes, rows
