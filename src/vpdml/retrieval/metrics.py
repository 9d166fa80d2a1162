"""Exact retrieval metrics for deep metric learning: Recall@K, MAP@R and R-Precision.

Plain tensors in, numbers out. The definitions follow Musgrave et al. 2020 ("A Metric Learning Reality
Check") and match pytorch-metric-learning's ``AccuracyCalculator`` with its defaults
(``avg_of_avgs=False``, ``k=None``, i.e. every reference item is ranked; ``k="max_bin_count"`` gives the
same numbers):

* Similarity is cosine: embeddings are L2-normalised here, whatever the caller did.
* **Single-set mode** (CUB, Cars, SOP): every item is a query against all the other items. The query is
  excluded by its *index*, so an exact duplicate of the query stored under another index still counts as
  a neighbour (and as a positive if it has the same label).
* **Query/gallery mode** (In-Shop): separate query and gallery sets; nothing is excluded.
* ``R`` of a query is the number of gallery items with its label (the query itself not counted).
  Queries with ``R == 0`` (singleton classes in single-set mode, labels absent from the gallery in
  query/gallery mode) are left out of *every* metric, exactly as pytorch-metric-learning does; how many
  queries counted is returned as ``num_queries``.
* ``recall@K``: fraction of counted queries with at least one same-label item among their K nearest
  neighbours (``recall@1`` is pytorch-metric-learning's ``precision_at_1``). When K exceeds the number
  of gallery items, the whole gallery is the top-K list, so every counted query is a hit.
* ``r_precision``: mean over queries of (same-label items among the top R) / R.
* ``map@r``: mean over queries of (1/R) * sum over ranks i <= R holding a same-label item of
  precision@i.
* Every query is weighted equally (no average of per-class averages).

Ranking and ties. Dot products of the normalised embeddings are accumulated in float64 and then rounded
to float32 scores. The rounding makes scores (almost always) independent of how BLAS splits the work, so
results do not depend on ``chunk_size`` or on which query rows share a matrix product, and exact
duplicate embeddings get exactly equal scores. Equal scores are ranked by **lower gallery index first**,
both at the top-k boundary and inside the list. pytorch-metric-learning's ``torch.topk`` / faiss order
equal scores arbitrarily, so the two agree exactly whenever the metrics do not depend on the order of
tied items (for example when only same-label items tie); otherwise the difference is confined to tied
items of different labels.

Memory. Queries are processed in chunks against the full gallery: the largest temporary is a
``chunk_size x N`` float32 score block (plus float64 slices of ``chunk_size x 4096``) next to a float32
unit-norm copy of the gallery, never the ``N x N`` matrix. Only ``k = max(max(recall_at), largest R in
the chunk)`` neighbours per query are kept, capped at the gallery size; queries that are left out are
never scored.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vpdml.retrieval.knn import (
    DeviceLike,
    EmbeddingsLike,
    check_same_dim,
    chunk_top_k,
    normalized_for_scoring,
    normalized_gallery,
    query_chunks,
    resolve_device,
    to_tensor,
    validated_chunk_size,
    validated_embeddings,
)

if TYPE_CHECKING:  # evaluate imports transformers pipelines (seconds): only load it on demand.
    import evaluate

__all__ = ["EVALUATE_METRIC_PATH", "format_metrics_table", "load_evaluate_metric", "retrieval_metrics"]
LabelsLike = torch.Tensor | np.ndarray | Sequence[int]

EVALUATE_METRIC_PATH = Path(__file__).resolve().parent / "evaluate_metric" / "vpdml_retrieval.py"
"""Path of the ``evaluate`` metric script; ``evaluate.load(str(EVALUATE_METRIC_PATH))`` works offline."""

_DISPLAY_NAMES = {"map@r": "MAP@R", "r_precision": "R-Precision", "num_queries": "Queries"}


def _validated_labels(
    value: LabelsLike, name: str, expected_length: int, embeddings_name: str
) -> torch.Tensor:
    """Check that ``value`` is a 1-D integer vector with one label per embedding; return it as int64."""
    if value is None:
        raise ValueError(
            f"`{name}` is required: pass one integer class label per row of `{embeddings_name}`."
        )
    labels = to_tensor(value, name)
    if labels.dim() != 1:
        raise ValueError(
            f"`{name}` must be a 1-D vector of class ids, got shape {tuple(labels.shape)}. "
            "Flatten it (e.g. labels.reshape(-1)) if it holds one label per item."
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"`{name}` must hold integer class ids, got {labels.dtype}. Cast with `.long()` / "
            "`.astype(np.int64)` (or map string labels to ids first)."
        )
    if labels.shape[0] != expected_length:
        raise ValueError(
            f"`{name}` has {labels.shape[0]} labels but `{embeddings_name}` has {expected_length} rows: "
            "pass exactly one label per embedding, in the same order."
        )
    # Labels are small: keep the bookkeeping on the CPU whatever device the caller used.
    return labels.long().cpu()


def _validated_recall_at(recall_at: Sequence[int]) -> tuple[int, ...]:
    """Return the sorted, de-duplicated K values, or explain what is wrong with them."""
    if isinstance(recall_at, numbers.Integral):
        recall_at = (int(recall_at),)
    values = tuple(recall_at)
    if not values:
        raise ValueError("`recall_at` is empty: pass at least one K, e.g. recall_at=(1, 2, 4, 8).")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"`recall_at` values must be positive integers, got {value!r} in {values!r}.")
    return tuple(sorted({int(value) for value in values}))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _positives_per_query(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, query_is_in_gallery: bool
) -> torch.Tensor:
    """R of each query: gallery items sharing its label, not counting the query itself."""
    unique_labels, counts = torch.unique(gallery_labels, return_counts=True)
    position = torch.searchsorted(unique_labels, query_labels).clamp(max=unique_labels.numel() - 1)
    label_in_gallery = unique_labels[position] == query_labels
    matches = torch.where(label_in_gallery, counts[position], torch.zeros_like(query_labels))
    return matches - int(query_is_in_gallery)


def _metric_sums_for_chunk(
    hits: torch.Tensor, positives: torch.Tensor, recall_at: tuple[int, ...]
) -> dict[str, float]:
    """Per-chunk sums (over queries) of recall@K hits, R-precision and average precision at R.

    Args:
        hits: (queries, k) bool, whether the neighbour at each rank has the query's label; k >= R.
        positives: (queries,) R of each query, all >= 1.
        recall_at: the K values.
    """
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device)
    within_r = ranks.unsqueeze(0) <= positives.unsqueeze(1)
    hits_within_r = hits & within_r
    r = positives.to(torch.float64)
    precision_at_rank = hits.cumsum(dim=1).to(torch.float64) / ranks.to(torch.float64)
    sums = {f"recall@{k}": float(hits[:, :k].any(dim=1).sum().item()) for k in recall_at}
    sums["map@r"] = float(((precision_at_rank * hits_within_r).sum(dim=1) / r).sum().item())
    sums["r_precision"] = float((hits_within_r.sum(dim=1) / r).sum().item())
    return sums


def retrieval_metrics(
    embeddings: EmbeddingsLike,
    labels: LabelsLike,
    *,
    query_embeddings: EmbeddingsLike | None = None,
    query_labels: LabelsLike | None = None,
    recall_at: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
    device: DeviceLike = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision with exact cosine k-NN (see the module docstring for definitions).

    Args:
        embeddings: (N, D) gallery embeddings; in single-set mode also the queries. Any float dtype
            (float16 / bfloat16 / float32 / float64), as a torch tensor, numpy array or nested lists.
        labels: (N,) integer class ids of ``embeddings``.
        query_embeddings: (Q, D) separate queries (query/gallery mode, e.g. In-Shop). Leave ``None`` for
            single-set mode, where every item queries all the others.
        query_labels: (Q,) integer class ids of ``query_embeddings``; required with them.
        recall_at: the K values of Recall@K (SOP: (1, 10, 100, 1000); In-Shop: (1, 10, 20, 30, 40, 50)).
        chunk_size: queries scored at once; memory is about ``chunk_size x N`` float32 scores. The
            result does not depend on it.
        device: where to compute (default: the gallery's device, or the CPU for numpy input).
        show_progress: show a tqdm progress bar over the queries.

    Returns:
        ``{"recall@K": ..., "map@r": ..., "r_precision": ..., "num_queries": ...}``; the rates are floats
        in [0, 1] averaged over the queries that have at least one same-label gallery item, and
        ``num_queries`` (an int) is how many those are.

    Raises:
        ValueError: on malformed input (shapes, dtypes, NaN, empty sets), or when no query has a
            same-label item in the gallery, so that every metric would be undefined.
    """
    recall_at = _validated_recall_at(recall_at)
    chunk_size = validated_chunk_size(chunk_size)
    gallery = validated_embeddings(embeddings, "embeddings")
    gallery_labels = _validated_labels(labels, "labels", gallery.shape[0], "embeddings")
    single_set = _is_single_set_mode(query_embeddings, query_labels)
    if single_set:
        queries, labels_of_queries = gallery, gallery_labels
    else:
        queries = validated_embeddings(query_embeddings, "query_embeddings")
        labels_of_queries = _validated_labels(
            query_labels, "query_labels", queries.shape[0], "query_embeddings"
        )
        check_same_dim(queries, gallery, "query_embeddings", "embeddings")

    positives = _positives_per_query(labels_of_queries, gallery_labels, query_is_in_gallery=single_set)
    counted = (positives > 0).nonzero().flatten()
    if counted.numel() == 0:
        raise ValueError(
            "No query has another item with its label in the gallery, so every metric is undefined. "
            "Check that the labels match between queries and gallery and that classes have at least "
            "two items (single-set mode) or at least one gallery item (query/gallery mode)."
        )
    available = gallery.shape[0] - int(single_set)
    _warn_if_recall_k_covers_gallery(recall_at, available)

    compute_device = resolve_device(device, embeddings)
    gallery_unit = normalized_gallery(gallery, compute_device)
    gallery_labels = gallery_labels.to(compute_device)
    sums = dict.fromkeys([f"recall@{k}" for k in recall_at] + ["map@r", "r_precision"], 0.0)
    with tqdm(
        total=counted.numel(), desc="retrieval metrics", unit="query", disable=not show_progress
    ) as bar:
        for rows in query_chunks(counted.numel(), chunk_size):
            query_rows = counted[rows]
            chunk_positives = positives[query_rows].to(compute_device)
            k = min(available, max(recall_at[-1], int(chunk_positives.max())))
            self_columns = query_rows.to(compute_device) if single_set else None
            query_unit = normalized_for_scoring(queries[query_rows.to(queries.device)], compute_device)
            _, neighbor_indices = chunk_top_k(query_unit, gallery_unit, k, self_columns)
            chunk_query_labels = labels_of_queries[query_rows].to(compute_device)
            hits = gallery_labels[neighbor_indices] == chunk_query_labels.unsqueeze(1)
            for name, value in _metric_sums_for_chunk(hits, chunk_positives, recall_at).items():
                sums[name] += value
            bar.update(query_rows.numel())

    num_queries = int(counted.numel())
    metrics: dict[str, float] = {name: total / num_queries for name, total in sums.items()}
    metrics["num_queries"] = num_queries
    return metrics


def _is_single_set_mode(query_embeddings: Any, query_labels: Any) -> bool:
    if (query_embeddings is None) != (query_labels is None):
        raise ValueError(
            "Pass `query_embeddings` and `query_labels` together (query/gallery mode), or neither "
            "(single-set mode, where `embeddings` are both queries and gallery)."
        )
    return query_embeddings is None


def _warn_if_recall_k_covers_gallery(recall_at: tuple[int, ...], available: int) -> None:
    too_large = [k for k in recall_at if k >= available]
    if too_large:
        warnings.warn(
            f"recall@K for K in {too_large} ranks the whole gallery ({available} candidates per query), "
            "so every query with a same-label item counts as a hit. Use smaller K for a gallery this size.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------
# Presentation and the `evaluate` integration
# --------------------------------------------------------------------------------------------------


def _display_name(key: str) -> str:
    if key.startswith("recall@"):
        return "R@" + key.removeprefix("recall@")
    return _DISPLAY_NAMES.get(key, key)


def _column_order(keys: Sequence[str]) -> list[str]:
    """recall@K by increasing K, then MAP@R and R-Precision, then anything else, then the query count."""
    unique_keys = list(dict.fromkeys(keys))
    recalls = sorted(
        (key for key in unique_keys if key.startswith("recall@") and key[7:].isdigit()),
        key=lambda key: int(key[7:]),
    )
    fixed = [key for key in ("map@r", "r_precision") if key in unique_keys]
    last = [key for key in ("num_queries",) if key in unique_keys]
    others = [key for key in unique_keys if key not in {*recalls, *fixed, *last}]
    return recalls + fixed + others + last


def _format_value(value: Any, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.{digits}f}"
    raise ValueError(f"metric values must be numbers, got {value!r} ({type(value).__name__}).")


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_metrics_table(
    metrics: Mapping[str, float] | Mapping[str, Mapping[str, float]], digits: int = 4
) -> str:
    """Render metrics as a small markdown table (for the CLI and model cards).

    Args:
        metrics: one result of :func:`retrieval_metrics` (one row), or ``{row name: result}`` for
            several runs or splits (one row each; a metric missing from a row shows as ``-``).
        digits: decimals for rates.

    Returns:
        The table, columns in the order R@K (increasing K), MAP@R, R-Precision, others, Queries.
    """
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("`metrics` must be a non-empty dict of metric values or of {row name: metrics}.")
    nested = [isinstance(value, Mapping) for value in metrics.values()]
    if any(nested) and not all(nested):
        raise ValueError(
            "`metrics` mixes plain values and nested dicts: pass either one result dict or {name: result}."
        )
    rows: dict[str, Mapping[str, Any]] = dict(metrics) if all(nested) else {"": metrics}
    columns = _column_order([key for row in rows.values() for key in row])
    header = ([""] if all(nested) else []) + [_display_name(key) for key in columns]
    lines = ["| " + " | ".join(_markdown_cell(cell) for cell in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for name, row in rows.items():
        cells = [_format_value(row[key], digits) if key in row else "-" for key in columns]
        if all(nested):
            cells.insert(0, name)
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def load_evaluate_metric(**load_kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` the packaged ``vpdml_retrieval`` metric from its local file (no Hub access).

    Extra keyword arguments go to ``evaluate.load`` (e.g. ``cache_dir``, ``experiment_id``).
    """
    import evaluate  # deferred: importing evaluate takes seconds

    return evaluate.load(str(EVALUATE_METRIC_PATH), **load_kwargs)
