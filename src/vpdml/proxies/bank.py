"""The training-only half of an adapter: learnable proxies O, and (VPTSP) class prompts, a proxy head, the
accumulator and the per-class semantic-proxy state P, mixed into the proxies Proxy Anchor scores against.

docs/method.md gives the method; docs/scale.md the row-sparse storage and sampled negatives used for many classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpdml.modules.head import EmbeddingHead
from vpdml.modules.row_sparse import gather_rows
from vpdml.proxies.accumulators import EMAAccumulator, GRUAccumulator, scatter_mean
from vpdml.proxies.class_prompts import HostResident, build_class_prompt_table
from vpdml.proxies.negatives import sample_negative_classes

__all__ = ["LossProxies", "ProxyBank"]


@dataclass
class LossProxies:
    """The proxies one Proxy-Anchor step scores against: every class, or a sample of the classes.

    ``classes`` is None when ``proxies`` holds all ``num_classes`` rows in class order; otherwise the sorted class
    id of each row, with ``negative_weights`` for the unbiased negative term (:func:`vpdml.proxies.loss.proxy_anchor_loss`).
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
        """The sampling arguments of :func:`vpdml.proxies.loss.proxy_anchor_loss`."""
        return {
            "proxy_classes": self.classes,
            "negative_weights": self.negative_weights,
            "num_classes": self.num_classes,
        }


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
        gru_init: str = "pytorch",
        class_prompt_storage: str = "dense",
        class_prompt_rank: int = 64,
        class_prompt_offload: bool = False,
        negatives: int | None = None,
        offload: bool = False,
        learnable_init: str = "kaiming",
        mix: str = "raw",
        semantic_init: str = "random",
        unseen: str = "semantic",
        proxy_head_init: str = "random",
        proxy_pass_every: int = 1,
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
        self.mix = mix
        self.semantic_init = semantic_init
        self.unseen = unseen
        self.proxy_head_init = proxy_head_init
        self.proxy_pass_every = proxy_pass_every
        self.learnable = nn.Parameter(
            init_learnable_proxies(torch.empty(num_classes, embedding_dim), learnable_init)
        )
        if negatives is not None:
            if negatives < 1:
                raise ValueError(f"proxy_negatives must be >= 1 (or None for every class), got {negatives}.")
            # Sampled proxies: O is read through gather_rows, so its gradient holds the sampled rows only.
            self.row_sparse_params = ("learnable",)
            self.host_buffers = (
                "semantic_state",
                "semantic_seen",
            )  # kept on the host with offload (HostResident)
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
            GRUAccumulator(embedding_dim, gru_dropout, init=gru_init)
            if semantic_proxies == "gru"
            else EMAAccumulator(keep_ratio)
        )
        self.register_buffer("semantic_state", F.normalize(torch.randn(num_classes, embedding_dim), dim=-1))
        # which classes' state P_c holds information (an update, or an initialisation from data) rather than its
        # random start; saved with the training state
        self.register_buffer("semantic_seen", torch.zeros(num_classes, dtype=torch.bool))
        if proxy_pass_every > 1:
            # training forward passes so far: the proxy pass runs when it is a multiple of proxy_pass_every (saved
            # with the state, so a resumed run keeps the rhythm)
            self.register_buffer("proxy_pass_clock", torch.zeros((), dtype=torch.long))

    def proxy_pass_due(self) -> bool:
        """Whether this forward pass runs the proxy pass (every ``proxy_pass_every``-th training pass; always in
        eval mode); advances the clock in training mode."""
        if self.proxy_pass_every == 1:
            return True
        tick = int(self.proxy_pass_clock)
        if self.training:
            self.proxy_pass_clock += 1
        return not self.training or tick % self.proxy_pass_every == 0

    @property
    def needs_data_init(self) -> bool:
        """Whether the proxy head or the semantic state start from the training data (:meth:`initialize_from_data`)."""
        return self.uses_semantic_proxies and (
            self.semantic_init == "class_means" or self.proxy_head_init == "embedding_head"
        )

    @torch.no_grad()
    def initialize_from_data(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Start the semantic branch from data: the proxy head as a copy of the (warmed-up) embedding ``head``
        (``proxy_head_init="embedding_head"``) and each class's state as the normalised mean of the proxy head's
        outputs over its images' cached ``features`` (``semantic_init="class_means"``)."""
        if self.proxy_head_init == "embedding_head":
            self.proxy_head.load_state_dict(head.state_dict())
        if self.semantic_init != "class_means":
            return
        outputs = torch.cat([self.proxy_head(chunk) for chunk in features.split(4096)])
        classes, means = scatter_mean(outputs.float(), labels.to(outputs.device))
        state = self.semantic_state
        state[classes.to(state.device)] = F.normalize(means, dim=-1).to(state.device, state.dtype)
        self.semantic_seen[classes.to(self.semantic_seen.device)] = True

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
        return self._mix(self.semantic_state.detach(), self.learnable, semantic_rows, self.semantic_seen)

    def _mix(
        self,
        state: torch.Tensor,
        learnable: torch.Tensor,
        batch_rows: tuple[torch.Tensor, torch.Tensor] | None,
        seen: torch.Tensor,
    ) -> torch.Tensor:
        """``normalise(lerp(P, O, alpha))`` over matching rows of ``state``, ``learnable`` and ``seen``
        (``normalise(O)`` in place of O with ``mix="normalized"``; O alone for rows not ``seen`` with
        ``unseen="learnable"``); ``batch_rows`` is ``(row positions, this step's semantic rows)``, which replace
        the stored state at those positions."""
        if self.mix == "normalized":
            learnable = F.normalize(learnable, dim=-1)
        mixed = torch.lerp(state.to(learnable.dtype), learnable, self.mix_alpha)
        if self.unseen == "learnable":
            mixed = torch.where(seen.to(mixed.device).unsqueeze(-1), mixed, learnable)
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
        rows_on_host = classes.to(self.semantic_state.device)
        state = self.semantic_state.index_select(0, rows_on_host).to(labels.device)
        seen = self.semantic_seen.index_select(0, rows_on_host)
        if semantic_rows is not None:
            batch_classes, rows = semantic_rows
            semantic_rows = (loss_proxies.rows_of(batch_classes), rows)
        loss_proxies.proxies = self._mix(state, learnable, semantic_rows, seen)
        return loss_proxies

    def accumulate(self, semantic: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the state rows of the batch's classes from their semantic vectors; returns the new rows with
        their graph (for this step's loss) and stores them detached (for later steps)."""
        # The accumulators read (and cast) only the batch's rows: no (C, E) copy of the state per step.
        state = self.semantic_state
        if self.semantic_init == "first_pass" and self.training:
            self._start_unseen_from(semantic, labels)
        classes, rows = self.accumulator(state, semantic, labels)
        if self.training:
            on_host = classes.to(state.device)
            state[on_host] = rows.detach().to(state.device, state.dtype)
            self.semantic_seen[on_host] = True
        return classes, rows

    @torch.no_grad()
    def _start_unseen_from(self, semantic: torch.Tensor, labels: torch.Tensor) -> None:
        """``semantic_init="first_pass"``: a class seen for the first time starts from the normalised mean of its
        semantic vectors instead of its random state (the accumulator then updates it as usual)."""
        classes, means = scatter_mean(semantic.detach().float(), labels)
        on_host = classes.to(self.semantic_seen.device)
        unseen = ~self.semantic_seen[on_host]
        if bool(unseen.any()):
            state = self.semantic_state
            state[on_host[unseen]] = F.normalize(means[unseen.to(means.device)], dim=-1).to(
                state.device, state.dtype
            )


def init_learnable_proxies(proxies: torch.Tensor, kind: str) -> torch.Tensor:
    """Initialise the learnable proxies O in place: ``"kaiming"`` (Proxy Anchor's ``kaiming_normal_``, fan-out:
    row norm about sqrt(2 E / C)) or ``"small"`` (the official VPTSP code's ``xavier_uniform_ / 8``: row norm about
    sqrt(2 E / (C + E)) / 8)."""
    if kind == "kaiming":
        return nn.init.kaiming_normal_(proxies, mode="fan_out")
    if kind == "small":
        with torch.no_grad():
            return nn.init.xavier_uniform_(proxies).div_(8.0)
    raise ValueError(f"learnable proxy init must be 'kaiming' or 'small', got {kind!r}.")
