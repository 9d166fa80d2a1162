"""Retrieval scores of a model on class-disjoint evaluation splits."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from vpdml.data import EvalSets, label_array
from vpdml.retrieval.embed import embed_dataset
from vpdml.retrieval.metrics import retrieval_metrics

__all__ = ["SplitEmbeddings", "embed_eval_sets", "evaluate_splits", "split_metrics"]


@dataclass
class SplitEmbeddings:
    """Embeddings of one evaluation split. ``same_set``: queries are the gallery (each query excluded from its
    own neighbours); otherwise separate query and gallery sets (In-Shop)."""

    query: torch.Tensor
    query_labels: torch.Tensor
    gallery: torch.Tensor
    gallery_labels: torch.Tensor
    same_set: bool


def embed_eval_sets(
    model: nn.Module,
    eval_sets: Mapping[str, EvalSets],
    transform: Callable[..., torch.Tensor],
    *,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    zero_shot: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, SplitEmbeddings]:
    """Embed the query and gallery images of each named split (a same-set split is embedded once)."""
    kwargs = {
        "batch_size": batch_size,
        "accelerator": accelerator,
        "zero_shot": zero_shot,
        "num_workers": num_workers,
        "show_progress": show_progress,
    }
    tag = "zero-shot " if zero_shot else ""
    result = {}
    for name, sets in eval_sets.items():
        gallery, gallery_labels = embed_dataset(
            model, sets.gallery, transform, desc=f"{tag}{name} gallery", **kwargs
        )
        if sets.same_set:
            query, query_labels = gallery, gallery_labels
        else:
            query, query_labels = embed_dataset(
                model, sets.query, transform, desc=f"{tag}{name} query", **kwargs
            )
        result[name] = SplitEmbeddings(query, query_labels, gallery, gallery_labels, sets.same_set)
    return result


def split_metrics(
    embeddings: SplitEmbeddings,
    recall_at: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision of one split (see :func:`vpdml.retrieval.metrics.retrieval_metrics`)."""
    if embeddings.same_set:
        return retrieval_metrics(
            embeddings.gallery,
            embeddings.gallery_labels,
            recall_at=recall_at,
            chunk_size=chunk_size,
            device=device,
        )
    return retrieval_metrics(
        embeddings.gallery,
        embeddings.gallery_labels,
        query_embeddings=embeddings.query,
        query_labels=embeddings.query_labels,
        recall_at=recall_at,
        chunk_size=chunk_size,
        device=device,
    )


def evaluate_splits(
    model: nn.Module,
    eval_sets: Mapping[str, EvalSets] | EvalSets,
    transform: Callable[..., torch.Tensor],
    recall_at: Sequence[int] = (1, 2, 4, 8),
    *,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    zero_shot: bool = False,
    num_workers: int = 0,
    chunk_size: int = 1024,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Retrieval metrics of ``model`` on each split: ``{split name: {"recall@1": ..., "map@r": ...}}``.

    ``eval_sets`` maps split names to :class:`vpdml.data.EvalSets` (from ``DMLSplits.eval_sets(name)``); a single
    ``EvalSets`` is reported as ``"test"``. Same-set splits (CUB, Cars, SOP) search every image against all the
    others; query/gallery splits (In-Shop) search the queries in the gallery.
    """
    if isinstance(eval_sets, EvalSets):
        eval_sets = {"test": eval_sets}
    embeddings = embed_eval_sets(
        model,
        eval_sets,
        transform,
        batch_size=batch_size,
        accelerator=accelerator,
        zero_shot=zero_shot,
        num_workers=num_workers,
        show_progress=show_progress,
    )
    device = accelerator.device if accelerator is not None else None
    return {
        name: split_metrics(split, recall_at, chunk_size=chunk_size, device=device)
        for name, split in embeddings.items()
    }


def class_names_of(dataset: Any) -> dict[int, str] | None:
    """Readable names of a split's dense labels, for plots: the source's ``ClassLabel`` names when it had them."""
    features = getattr(dataset, "features", {})
    for column in ("original_label", "label"):
        names = getattr(features.get(column), "names", None)
        if names:
            source = label_array(dataset, column)
            dense = label_array(dataset)
            return {int(d): str(names[int(s)]) for d, s in zip(dense.tolist(), source.tolist(), strict=True)}
    return None
