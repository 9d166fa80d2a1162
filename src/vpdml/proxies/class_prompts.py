"""Storage of the class prompts: dense, row-sparse (optionally in host memory) or low-rank.

Every table holds prompts for C classes, ``K = sum_l m_l`` tokens over the prompted layers and width D, and
answers ``gather(labels)`` with one ``(B, m_l, D)`` tensor per layer (None where ``m_l = 0``). They differ in what
a training step costs (docs/scale.md):

* ``dense``: one ``(C, K, D)`` parameter. Its gradient and AdamW state are table-sized and every row is updated
  every step: simple and exact, right for a few hundred classes.
* ``sparse``: the same ``(C, K, D)`` parameter, gathered with a row-sparse gradient and updated by
  :class:`vpdml.modules.row_sparse.RowSparseAdamW` / ``RowSparseSGD`` only where the batch's classes are. With
  ``offload=True`` the table (and so its optimizer state) stays in host memory and only the batch's rows travel.
* ``low_rank``: ``q_c = code_c @ basis``, a shared ``(r, K, D)`` basis and a row-sparse ``(C, r)`` code table:
  memory ``C*r + r*K*D`` instead of ``C*K*D``, at the price of a rank-r restriction of the prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import nn

from vpdml.modules.prompts import xavier_normal_prompts
from vpdml.modules.row_sparse import gather_rows

ClassPromptStorage = Literal["auto", "dense", "sparse", "low_rank"]
STORAGE_KINDS: tuple[str, ...] = ("auto", "dense", "sparse", "low_rank")

#: ``auto`` keeps a dense table up to this many elements (2**25 floats = 128 MiB; CUB ViT-S is 1.4M, Cars 15M)
#: and goes row-sparse above it (SOP ViT-S is 261M, In-Shop 1.47B). Below it the dense table's per-step cost
#: (a table-sized gradient and AdamW pass) is small next to two ViT passes, and it keeps dense-optimizer
#: semantics for the small datasets the paper's recipes were tuned on.
AUTO_SPARSE_MIN_ELEMENTS = 1 << 25


def resolve_class_prompt_storage(
    storage: str, *, num_classes: int, tokens: int, hidden_size: int, offload: bool = False
) -> str:
    """The storage ``auto`` stands for (sparse when offloading or above :data:`AUTO_SPARSE_MIN_ELEMENTS`)."""
    if storage not in STORAGE_KINDS:
        raise ValueError(f"class_prompt_storage must be one of {STORAGE_KINDS}, got {storage!r}.")
    if storage != "auto":
        return storage
    if offload or num_classes * tokens * hidden_size > AUTO_SPARSE_MIN_ELEMENTS:
        return "sparse"
    return "dense"


def _split_layers(rows: torch.Tensor, offsets: list[int], counts: list[int]) -> list[torch.Tensor | None]:
    """Per layer, the ``(B, m_l, D)`` slice of ``(B, K, D)`` rows (views; None where ``m_l = 0``)."""
    return [rows[:, start : start + n] if n else None for start, n in zip(offsets, counts, strict=True)]


def _offsets(counts: list[int]) -> list[int]:
    return [sum(counts[:i]) for i in range(len(counts))]


@torch.no_grad()
def center_table_on(
    weight: torch.Tensor, offsets: list[int], counts: list[int], token_means: torch.Tensor
) -> None:
    """``q_cj <- token_means[l] + (q_cj - mean_k q_ck)`` for every class ``c`` in every layer ``l`` of a
    ``(C, K, D)`` table: the class-prompt form of :meth:`vpdml.modules.prompts.VisualPrompts.center_on`."""
    expected = (len(counts), weight.shape[-1])
    if tuple(token_means.shape) != expected:
        raise ValueError(
            f"token_means must be (num_layers, hidden_size) = {expected}, got {tuple(token_means.shape)}."
        )
    for layer, (start, n) in enumerate(zip(offsets, counts, strict=True)):
        if n:
            block = weight[:, start : start + n]
            block.copy_(block - block.mean(dim=1, keepdim=True) + token_means[layer].to(block))


class ClassPromptTable(nn.Module):
    """Dense class prompts: one ``(C, sum_l m_l, D)`` table, gathered by label and split per layer."""

    row_sparse_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int, counts: list[int], hidden_size: int) -> None:
        super().__init__()
        self.counts = list(counts)
        self.offsets = _offsets(self.counts)
        self.weight = nn.Parameter(xavier_normal_prompts(num_classes, sum(counts), hidden_size))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def gather(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the ``(B, m_l, D)`` prompts of each sample's class (None where m_l = 0)."""
        rows = self.weight[labels]  # one gather for all layers: only the batch's rows enter the graph
        return _split_layers(rows, self.offsets, self.counts)

    def center_on(self, token_means: torch.Tensor) -> None:
        """Centre every class's prompts on ``token_means`` (``(layers, D)``): see :func:`center_table_on`."""
        center_table_on(self.weight, self.offsets, self.counts, token_means)


class HostResident(nn.Module):
    """Mixin: with ``offload``, the row-sparse parameters (and ``host_buffers``) ignore ``.to()`` / ``.cuda()`` /
    ``.half()``.

    They stay fp32 in host memory (so does the optimizer state created for them); ``gather`` moves only the
    batch's rows to the labels' device. Other parameters and buffers move as usual.
    """

    row_sparse_params: ClassVar[tuple[str, ...]] = ()
    host_buffers: ClassVar[tuple[str, ...]] = ()
    offload: bool = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        if not self.offload:
            return super()._apply(fn, recurse)
        kept = [_detach_entries(self._parameters, self.row_sparse_params)]
        kept.append(_detach_entries(self._buffers, self.host_buffers))
        try:
            super()._apply(fn, recurse)
        finally:
            for registry, (order, entries) in zip((self._parameters, self._buffers), kept, strict=True):
                moved = dict(registry)
                registry.clear()
                for name in order:  # keep the registration order: optimizer state is matched by position
                    registry[name] = entries[name] if name in entries else moved[name]
        return self


def _detach_entries(registry: dict, names: tuple[str, ...]) -> tuple[list[str], dict]:
    """Remove ``names`` from a module's parameter or buffer registry; returns the original order and them."""
    order = list(registry)
    return order, {name: registry.pop(name) for name in names if name in registry}


class RowSparseClassPromptTable(HostResident):
    """Class prompts as a ``(C, K, D)`` table whose gradient holds only the batch's classes.

    Train it with :class:`vpdml.modules.row_sparse.RowSparseAdamW` or ``RowSparseSGD`` (dense PyTorch optimizers reject
    sparse gradients). ``offload=True`` keeps the table in host memory.
    """

    row_sparse_params: ClassVar[tuple[str, ...]] = ("weight",)

    def __init__(
        self, num_classes: int, counts: list[int], hidden_size: int, *, offload: bool = False
    ) -> None:
        super().__init__()
        self.counts = list(counts)
        self.offsets = _offsets(self.counts)
        self.offload = offload
        self.weight = nn.Parameter(xavier_normal_prompts(num_classes, sum(counts), hidden_size))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def gather(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the ``(B, m_l, D)`` prompts of each sample's class, on the labels' device."""
        classes, inverse = torch.unique(labels, return_inverse=True)
        rows = gather_rows(self.weight, classes, labels.device)  # (U, K, D): one row per distinct class
        return _split_layers(rows[inverse], self.offsets, self.counts)

    def center_on(self, token_means: torch.Tensor) -> None:
        """Centre every class's prompts on ``token_means`` (``(layers, D)``): see :func:`center_table_on`."""
        center_table_on(self.weight, self.offsets, self.counts, token_means)

    def extra_repr(self) -> str:
        classes, tokens, hidden = self.weight.shape
        return f"classes={classes}, tokens={tokens}, hidden={hidden}, offload={self.offload}"


class LowRankClassPromptTable(HostResident):
    """Class prompts ``q_c = code_c @ basis``: a shared ``(r, K, D)`` basis and a row-sparse ``(C, r)`` code table.

    Initialised so that the prompts have the dense table's xavier-normal scale. ``offload`` applies to the codes
    (the basis is shared by every class and stays with the model).
    """

    row_sparse_params: ClassVar[tuple[str, ...]] = ("codes",)

    def __init__(
        self, num_classes: int, counts: list[int], hidden_size: int, rank: int, *, offload: bool = False
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"The low-rank class-prompt table needs rank >= 1, got {rank}.")
        self.counts = list(counts)
        self.offsets = _offsets(self.counts)
        self.offload = offload
        # std(code @ basis) = sqrt(rank * (1 / rank) * sigma^2) = sigma, the dense table's init scale.
        self.codes = nn.Parameter(torch.randn(num_classes, rank) / math.sqrt(rank))
        self.basis = nn.Parameter(xavier_normal_prompts(rank, sum(counts), hidden_size))

    @property
    def num_classes(self) -> int:
        return self.codes.shape[0]

    @property
    def rank(self) -> int:
        return self.codes.shape[1]

    def gather(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the ``(B, m_l, D)`` prompts of each sample's class, on the labels' device."""
        classes, inverse = torch.unique(labels, return_inverse=True)
        codes = gather_rows(self.codes, classes, labels.device)  # (U, r)
        rows = (codes @ self.basis.flatten(1)).view(len(classes), *self.basis.shape[1:])
        return _split_layers(rows[inverse], self.offsets, self.counts)

    def center_on(self, token_means: torch.Tensor) -> None:
        raise ValueError(
            "A low-rank class-prompt table cannot be centred on token means (every class's prompts are code @ basis, "
            "with no per-class offset). Use class_prompt_storage='dense' or 'sparse' with class_prompt_init='token_mean'."
        )

    def extra_repr(self) -> str:
        rank, tokens, hidden = self.basis.shape
        return f"classes={self.num_classes}, rank={rank}, tokens={tokens}, hidden={hidden}, offload={self.offload}"


def build_class_prompt_table(
    storage: str,
    *,
    num_classes: int,
    counts: list[int],
    hidden_size: int,
    rank: int = 64,
    offload: bool = False,
) -> nn.Module:
    """The class-prompt table for a storage kind (``auto`` resolved with :func:`resolve_class_prompt_storage`)."""
    kind = resolve_class_prompt_storage(
        storage, num_classes=num_classes, tokens=sum(counts), hidden_size=hidden_size, offload=offload
    )
    if kind == "dense":
        if offload:
            raise ValueError(
                "class_prompt_offload needs a row-sparse table: use class_prompt_storage='sparse' or 'low_rank' "
                "(a dense table's gradient and optimizer step cover every row, so it cannot stay on the host)."
            )
        return ClassPromptTable(num_classes, counts, hidden_size)
    if kind == "sparse":
        return RowSparseClassPromptTable(num_classes, counts, hidden_size, offload=offload)
    return LowRankClassPromptTable(num_classes, counts, hidden_size, rank, offload=offload)
