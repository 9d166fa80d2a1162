"""Proxies for the Proxy-Anchor loss: learnable proxies, class prompts and semantic-proxy accumulation.

VPTSP (DESIGN.md section 1, items 4-6): each class c owns class prompts q_c. A second pass of the frozen
backbone where every image gets the class prompts of its own label gives, through a proxy head, one
"semantic" vector s_i per image. A per-class state P_c (a buffer) accumulates those vectors across batches
by EMA or a GRU; the loss uses Q_c = normalise((1 - alpha) * P_c + alpha * O_c) with learnable proxies O.

Everything here is training-only: none of it is needed to embed images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import EmbeddingHead
from .prompts import xavier_normal_prompts


class ClassPromptTable(nn.Module):
    """Dense class prompts: one ``(C, sum_l m_l, D)`` table, gathered by label and split per layer."""

    def __init__(self, num_classes: int, counts: list[int], hidden_size: int) -> None:
        super().__init__()
        self.counts = list(counts)
        self.offsets = [sum(counts[:i]) for i in range(len(counts))]
        self.weight = nn.Parameter(xavier_normal_prompts(num_classes, sum(counts), hidden_size))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def gather(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the ``(B, m_l, D)`` prompts of each sample's class (None where m_l = 0)."""
        rows = self.weight[labels]  # one gather for all layers: only the batch's rows enter the graph
        return [
            rows[:, start : start + n] if n else None
            for start, n in zip(self.offsets, self.counts, strict=True)
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
        updated = self.keep_ratio * state[classes] + (1.0 - self.keep_ratio) * means
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
        current = state[classes]
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
    ) -> None:
        super().__init__()
        self.semantic_kind = semantic_proxies
        self.mix_alpha = mix_alpha
        self.learnable = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.learnable, mode="fan_out")  # as in Proxy Anchor
        if semantic_proxies == "none":
            return
        self.class_prompts = ClassPromptTable(num_classes, class_prompt_counts, hidden_size)
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
        state = self.semantic_state.detach().to(self.learnable.dtype)
        if semantic_rows is not None:
            classes, rows = semantic_rows
            state = state.index_put((classes,), rows.to(state.dtype))
        return F.normalize((1.0 - self.mix_alpha) * state + self.mix_alpha * self.learnable, dim=-1)

    def accumulate(self, semantic: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the state rows of the batch's classes from their semantic vectors; returns the new rows with
        their graph (for this step's loss) and stores them detached (for later steps)."""
        classes, rows = self.accumulator(self.semantic_state.to(semantic.dtype), semantic, labels)
        if self.training:
            self.semantic_state[classes] = rows.detach().to(self.semantic_state.dtype)
        return classes, rows
