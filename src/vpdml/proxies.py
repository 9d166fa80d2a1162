"""Proxies for the Proxy-Anchor loss: learnable proxies, class prompts and semantic-proxy accumulation.

VPTSP (DESIGN.md section 1, items 4-6): each class c owns class prompts q_c. A second pass of the frozen
backbone where every image gets the class prompts of its own label gives, through a proxy head, one
"semantic" vector s_i per image. A per-class state P_c (a buffer) accumulates those vectors across batches
by EMA or a GRU; the loss uses Q_c = normalise((1 - alpha) * P_c + alpha * O_c) with learnable proxies O.

Everything here is training-only: none of it is needed to embed images.

The class prompts are stored by :mod:`vpdml.class_prompt_tables` (dense, row-sparse or low-rank). Proxy Anchor's
negative term compares every sample with every proxy, so by default each step reads every row of P and gives every
row of O a gradient: a ``(C, E)`` cost per step, fine up to ~100k classes. With ``negatives`` (the config's
``proxy_negatives``) a step scores the batch's classes plus that many sampled other classes, reweighted to an
unbiased estimate of the full loss; O then gets a row-sparse gradient and a step costs ``(B + negatives) x E``
whatever C (docs/scale.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .class_prompt_tables import ClassPromptTable, HostResident, build_class_prompt_table
from .heads import EmbeddingHead
from .row_sparse import gather_rows

__all__ = [
    "ClassPromptTable",
    "EMAAccumulator",
    "GRUAccumulator",
    "LossProxies",
    "ProxyBank",
    "sample_negative_classes",
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
        updated = self.keep_ratio * _rows(state, classes, means) + (1.0 - self.keep_ratio) * means
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


def _rank_within_class(inverse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For each sample, how many earlier batch samples share its class (0 for the first)."""
    one_hot = F.one_hot(inverse, num_classes)
    return (one_hot.cumsum(0) * one_hot).sum(-1) - 1


@dataclass
class LossProxies:
    """The proxies one Proxy-Anchor step scores against: every class, or a sample of the classes.

    ``classes`` is None when ``proxies`` holds all ``num_classes`` rows in class order; otherwise the sorted class
    id of each row, with ``negative_weights`` for the unbiased negative term (:func:`vpdml.losses.proxy_anchor_loss`).
    """

    proxies: torch.Tensor
    num_classes: int
    classes: torch.Tensor | None = None
    negative_weights: torch.Tensor | None = None

    def rows_of(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Row index in ``proxies`` of each class id (which must be among ``classes``)."""
        if self.classes is None:
            return class_ids
        return torch.searchsorted(self.classes, class_ids)

    def loss_kwargs(self) -> dict[str, torch.Tensor | int | None]:
        """The sampling arguments of :func:`vpdml.losses.proxy_anchor_loss`."""
        return {
            "proxy_classes": self.classes,
            "negative_weights": self.negative_weights,
            "num_classes": self.num_classes,
        }


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


class ProxyBank(HostResident):
    """The training-only half of an adapter: learnable proxies, and (VPTSP) class prompts, a proxy head,
    the accumulator and the per-class semantic-proxy state.

    With ``negatives`` (sampled negative proxies) the learnable proxies are row-sparse; ``offload`` then keeps
    them, their optimizer state and the semantic-proxy state in host memory (only the sampled rows travel).
    """

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
        negatives: int | None = None,
        offload: bool = False,
    ) -> None:
        super().__init__()
        if offload and negatives is None:
            raise ValueError(
                "proxy_offload needs proxy_negatives: the exact loss reads every proxy and updates every row each "
                "step, so the proxies cannot stay in host memory. Set proxy_negatives=N (docs/scale.md)."
            )
        self.offload = offload
        self.semantic_kind = semantic_proxies
        self.mix_alpha = mix_alpha
        self.negatives = negatives
        self.learnable = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.learnable, mode="fan_out")  # as in Proxy Anchor
        if negatives is not None:
            if negatives < 1:
                raise ValueError(f"proxy_negatives must be >= 1 (or None for every class), got {negatives}.")
            # Sampled proxies: O is read through gather_rows, so its gradient holds the sampled rows only.
            self.row_sparse_params = ("learnable",)
            self.host_buffers = ("semantic_state",)  # kept on the host with offload (HostResident)
            # (seed, steps taken): the sample of a step is a function of both, so every process draws the same
            # sample and a resumed run draws the samples the uninterrupted one would have (saved with the state).
            # The seed is the global generator's, read without drawing from it: the rest of the initialisation
            # stays that of a model without sampling.
            seed = torch.initial_seed() % 2**62
            self.register_buffer("negative_sampling", torch.tensor([seed, 0], dtype=torch.long))
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
        return self._mix(self.semantic_state.detach(), self.learnable, semantic_rows)

    def _mix(
        self,
        state: torch.Tensor,
        learnable: torch.Tensor,
        batch_rows: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``normalise(lerp(P, O, alpha))`` over matching rows of ``state`` and ``learnable``; ``batch_rows`` is
        ``(row positions, this step's semantic rows)``, which replace the stored state at those positions."""
        mixed = torch.lerp(state.to(learnable.dtype), learnable, self.mix_alpha)
        if batch_rows is not None:
            where, rows = batch_rows
            batch = torch.lerp(rows.to(mixed.dtype), learnable[where], self.mix_alpha)
            mixed = mixed.index_put_((where,), batch)
        return F.normalize(mixed, dim=-1)

    def loss_proxies(
        self,
        labels: torch.Tensor,
        semantic_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        learnable_only: bool = False,
    ) -> LossProxies:
        """The proxies this step's loss scores ``labels`` against: :meth:`mixed_proxies` for every class or, with
        sampled negatives, for the batch's classes and a fresh sample of other classes (a new sample per call in
        training mode). ``learnable_only`` uses ``normalise(O)`` (the head warm-up's proxies)."""
        if self.negatives is None:
            if learnable_only:
                return LossProxies(F.normalize(self.learnable, dim=-1), self.num_classes)
            return LossProxies(self.mixed_proxies(semantic_rows), self.num_classes)
        seed, step = (int(v) for v in self.negative_sampling)
        if self.training:
            self.negative_sampling[1] += 1
        generator = torch.Generator().manual_seed((seed + step * 0x9E3779B97F4A7C15) % 2**63)
        sample = sample_negative_classes(labels, self.num_classes, self.negatives, generator)
        if sample is None:
            classes, weights = torch.arange(self.num_classes), None
        else:
            classes, weights = sample
            weights = weights.to(labels.device)
        learnable = gather_rows(self.learnable, classes, labels.device)
        loss_proxies = LossProxies(learnable, self.num_classes, classes.to(labels.device), weights)
        if learnable_only or not self.uses_semantic_proxies:
            loss_proxies.proxies = F.normalize(learnable, dim=-1)
            return loss_proxies
        state = self.semantic_state.index_select(0, classes.to(self.semantic_state.device)).to(labels.device)
        if semantic_rows is not None:
            batch_classes, rows = semantic_rows
            semantic_rows = (loss_proxies.rows_of(batch_classes), rows)
        loss_proxies.proxies = self._mix(state, learnable, semantic_rows)
        return loss_proxies

    def accumulate(self, semantic: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the state rows of the batch's classes from their semantic vectors; returns the new rows with
        their graph (for this step's loss) and stores them detached (for later steps)."""
        # The accumulators read (and cast) only the batch's rows: no (C, E) copy of the state per step.
        state = self.semantic_state
        classes, rows = self.accumulator(state, semantic, labels)
        if self.training:
            state[classes.to(state.device)] = rows.detach().to(state.device, state.dtype)
        return classes, rows
