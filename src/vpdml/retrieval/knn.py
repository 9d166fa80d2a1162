"""KNN"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

if TYPE_CHECKING:  # evaluate imports transformers pipelines (seconds): only load it on demand.
    pass

__all__ = ["nearest_neighbors"]

EmbeddingsLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]
DeviceLike = torch.device | str | None

# Scores are accumulated in float64 and rounded to float32 (see the module docstring). The gallery is
# kept as float32 unit vectors and widened a slice of this many rows at a time, so neither the gallery
# nor a score block ever exists in float64 in full.
_ACCUMULATE_DTYPE = torch.float64
_SCORE_DTYPE = torch.float32
_GALLERY_ROWS_PER_SLICE = 4096


# --------------------------------------------------------------------------------------------------
# Input validation and conversion
# --------------------------------------------------------------------------------------------------


def to_tensor(value: Any, name: str) -> torch.Tensor:
    """Turn a tensor, numpy array or nested sequence of numbers into a tensor (tensors are not copied)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        # ascontiguousarray also fixes negative strides, which torch.from_numpy rejects.
        return torch.from_numpy(np.ascontiguousarray(value))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"could not turn `{name}` ({type(value).__name__}) into a numeric tensor: {error}. Pass a torch "
            "tensor, a numpy array or equal-length nested sequences of numbers."
        ) from error


def validated_embeddings(value: EmbeddingsLike, name: str) -> torch.Tensor:
    """Check that ``value`` is a finite, non-empty (N, D) floating-point matrix and return it as a tensor."""
    if value is None:
        raise ValueError(f"`{name}` is required: pass an (N, D) matrix of embeddings.")
    embeddings = to_tensor(value, name)
    if embeddings.dim() != 2:
        raise ValueError(
            f"`{name}` must be a 2-D (num_items, dim) matrix, got shape {tuple(embeddings.shape)}. "
            "Stack one embedding per row (e.g. torch.stack(list_of_vectors))."
        )
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(embeddings.shape)}): pass at least one embedding.")
    if not embeddings.is_floating_point():
        raise ValueError(
            f"`{name}` must hold floating-point values (float16, bfloat16, float32 or float64), got "
            f"{embeddings.dtype}. Did you pass labels as embeddings? Otherwise cast with `.float()`."
        )
    if not bool(torch.isfinite(embeddings).all()):
        bad_rows = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"`{name}` contains NaN or infinite values in {bad_rows.numel()} row(s) "
            f"(first: {bad_rows[:5].tolist()}). Fix the model output (e.g. a diverged run or fp16 "
            "overflow) or drop those rows before computing metrics."
        )
    return embeddings


def validated_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer (queries per block), got {chunk_size!r}.")
    return int(chunk_size)


def resolve_device(device: DeviceLike, reference: Any) -> torch.device:
    """Use the requested device, else the device of the (tensor) gallery, else the CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(reference, torch.Tensor):
        return reference.device
    return torch.device("cpu")


def normalized_for_scoring(embeddings: torch.Tensor, device: torch.device) -> torch.Tensor:
    """L2-normalise in the accumulation dtype (half-precision inputs are widened exactly first)."""
    return F.normalize(embeddings.to(device=device, dtype=_ACCUMULATE_DTYPE), p=2, dim=1)


def normalized_gallery(gallery: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Unit gallery rows as float32, normalised in float64 a slice at a time (no full float64 copy)."""
    unit = torch.empty(gallery.shape, dtype=_SCORE_DTYPE, device=device)
    for start in range(0, gallery.shape[0], _GALLERY_ROWS_PER_SLICE):
        stop = start + _GALLERY_ROWS_PER_SLICE
        unit[start:stop] = normalized_for_scoring(gallery[start:stop], device)
    return unit


# --------------------------------------------------------------------------------------------------
# Chunked exact top-k
# --------------------------------------------------------------------------------------------------


def _score_block(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine scores of float64 unit ``queries`` against the float32 unit ``gallery``, rounded to float32.

    The float64 products are made a slice of gallery rows at a time and rounded into the float32
    block, so the float64 temporaries stay small however large the gallery is.
    """
    scores = torch.empty(queries.shape[0], gallery.shape[0], dtype=_SCORE_DTYPE, device=queries.device)
    for start in range(0, gallery.shape[0], _GALLERY_ROWS_PER_SLICE):
        stop = start + _GALLERY_ROWS_PER_SLICE
        gallery_slice = gallery[start:stop].to(_ACCUMULATE_DTYPE)
        scores[:, start:stop] = queries @ gallery_slice.T  # the copy rounds float64 -> float32
    return scores


def _lowest_index_selection(scores: torch.Tensor, kth_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k column indices per row, taking the lowest indices among scores tied at the k-th place.

    Args:
        scores: (rows, N) scores of rows whose k-th and (k+1)-th largest score are equal.
        kth_scores: (rows,) the k-th largest score of each row.
        k: number of columns to select per row.

    Returns:
        (rows, k) column indices in increasing order.
    """
    threshold = kth_scores.unsqueeze(1)
    above = scores > threshold
    at_threshold = scores == threshold
    still_needed = k - above.sum(dim=1, keepdim=True)
    rank_among_tied = at_threshold.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    chosen = above | (at_threshold & (rank_among_tied <= still_needed))
    return chosen.nonzero()[:, 1].view(-1, k)


def _top_k_lowest_index_on_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row, ordered by score (descending) then column index (ascending).

    ``torch.topk`` picks arbitrarily among equal scores; this makes the choice deterministic. Checking
    the (k+1)-th score finds the rows where the choice matters, and only those rows pay for the fix.
    """
    num_columns = scores.shape[1]
    probe = min(k + 1, num_columns)
    top_scores, top_indices = torch.topk(scores, probe, dim=1, largest=True, sorted=True)
    if probe > k:
        boundary_is_tied = top_scores[:, k] == top_scores[:, k - 1]
        top_scores, top_indices = top_scores[:, :k].contiguous(), top_indices[:, :k].contiguous()
        tied_rows = boundary_is_tied.nonzero().flatten()
        if tied_rows.numel() > 0:
            tied_scores = scores[tied_rows]
            fixed = _lowest_index_selection(tied_scores, top_scores[tied_rows, k - 1], k)
            top_indices[tied_rows] = fixed
            top_scores[tied_rows] = tied_scores.gather(1, fixed)
    # Sort by index, then stable-sort by score: equal scores end up in increasing index order.
    top_indices, by_index = top_indices.sort(dim=1)
    top_scores = top_scores.gather(1, by_index)
    top_scores, by_score = top_scores.sort(dim=1, descending=True, stable=True)
    return top_scores, top_indices.gather(1, by_score)


def chunk_top_k(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, self_columns: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items for a block of normalised queries; row i never gets ``self_columns[i]``."""
    scores = _score_block(queries, gallery)
    if self_columns is not None:
        scores[torch.arange(scores.shape[0], device=scores.device), self_columns] = -math.inf
    return _top_k_lowest_index_on_ties(scores, k)


def query_chunks(num_queries: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, num_queries, chunk_size):
        yield slice(start, min(start + chunk_size, num_queries))


def nearest_neighbors(
    query_embeddings: EmbeddingsLike,
    gallery_embeddings: EmbeddingsLike,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = 1024,
    device: DeviceLike = None,
    show_progress: bool = False,
    gallery_is_unit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine k-nearest neighbours of each query in the gallery, computed in chunks of queries.

    Args:
        query_embeddings: (Q, D) queries (torch tensor of any float dtype, numpy array or nested lists).
        gallery_embeddings: (N, D) gallery.
        k: neighbours per query, at most N (N - 1 with ``exclude_self``).
        exclude_self: the queries *are* the gallery (query i is gallery item i); item i is never returned
            as its own neighbour. Exclusion is by index, so duplicates of item i stored elsewhere are kept.
        chunk_size: queries scored at once; memory is about ``chunk_size x N`` float32 scores.
        device: where to compute (default: the gallery's device, or the CPU for numpy input).
        show_progress: show a tqdm progress bar over the queries.
        gallery_is_unit: the gallery is already the output of :func:`unit_gallery` (checked, L2-normalised,
            float32 on ``device``): skip checking and normalising it again. A search service that queries the
            same gallery many times saves a full pass over it per call (1M x 512: seconds on a CPU).

    Returns:
        ``(scores, indices)``: (Q, k) float32 cosine similarities, descending, and the int64 gallery
        indices they belong to, on the CPU. Equal scores are ordered by lower gallery index.
    """
    queries = validated_embeddings(query_embeddings, "query_embeddings")
    gallery = (
        gallery_embeddings
        if gallery_is_unit
        else validated_embeddings(gallery_embeddings, "gallery_embeddings")
    )
    check_same_dim(queries, gallery, "query_embeddings", "gallery_embeddings")
    chunk_size = validated_chunk_size(chunk_size)
    if exclude_self and queries.shape[0] != gallery.shape[0]:
        raise ValueError(
            f"exclude_self=True means query i is gallery item i, but there are {queries.shape[0]} queries "
            f"and {gallery.shape[0]} gallery items. Pass the same matrix twice, or exclude_self=False."
        )
    available = gallery.shape[0] - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= available:
        raise ValueError(
            f"`k` must be an integer between 1 and {available} (the gallery size"
            f"{' minus the excluded query' if exclude_self else ''}), got {k!r}."
        )

    compute_device = resolve_device(device, gallery_embeddings)
    gallery_unit = gallery if gallery_is_unit else normalized_gallery(gallery, compute_device)
    all_scores = torch.empty(queries.shape[0], int(k), dtype=_SCORE_DTYPE)
    all_indices = torch.empty(queries.shape[0], int(k), dtype=torch.long)
    with tqdm(
        total=queries.shape[0], desc="nearest neighbours", unit="query", disable=not show_progress
    ) as bar:
        for rows in query_chunks(queries.shape[0], chunk_size):
            self_columns = (
                torch.arange(rows.start, rows.stop, device=compute_device) if exclude_self else None
            )
            query_unit = normalized_for_scoring(queries[rows], compute_device)
            scores, indices = chunk_top_k(query_unit, gallery_unit, int(k), self_columns)
            all_scores[rows], all_indices[rows] = scores.cpu(), indices.cpu()
            bar.update(rows.stop - rows.start)
    return all_scores, all_indices


def unit_gallery(gallery_embeddings: EmbeddingsLike, device: DeviceLike = None) -> torch.Tensor:
    """The checked, L2-normalised float32 gallery that ``nearest_neighbors(..., gallery_is_unit=True)`` takes."""
    gallery = validated_embeddings(gallery_embeddings, "gallery_embeddings")
    return normalized_gallery(gallery, resolve_device(device, gallery_embeddings))


def check_same_dim(first: torch.Tensor, second: torch.Tensor, first_name: str, second_name: str) -> None:
    if first.shape[1] != second.shape[1]:
        raise ValueError(
            f"`{first_name}` has dimension {first.shape[1]} but `{second_name}` has {second.shape[1]}: "
            "queries and gallery must come from the same embedding model."
        )
