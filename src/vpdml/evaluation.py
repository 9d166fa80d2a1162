"""Embed image datasets with a trained (or zero-shot) model and score retrieval on class-disjoint splits.

Works for a PEFT model with a vpdml adapter and for :class:`vpdml.FullFineTuningDML`. With an ``accelerate``
``Accelerator`` of several processes, every process embeds a contiguous shard of the images and the shards are
gathered back in dataset order, so every process ends with the same ``(N, E)`` matrix and the same metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .architectures import pooled_features
from .data import DMLTransformDataset, EvalSets, collate, label_array
from .full_finetune import FullFineTuningDML
from .metrics import retrieval_metrics

__all__ = [
    "SplitEmbeddings",
    "embed_dataset",
    "embed_eval_sets",
    "evaluate_splits",
    "split_metrics",
]

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SplitEmbeddings:
    """Embeddings of one evaluation split. ``same_set``: queries are the gallery (each query excluded from its
    own neighbours); otherwise separate query and gallery sets (In-Shop)."""

    query: torch.Tensor
    query_labels: torch.Tensor
    gallery: torch.Tensor
    gallery_labels: torch.Tensor
    same_set: bool


@contextlib.contextmanager
def model_embedder(model: nn.Module, *, zero_shot: bool = False) -> Iterator[EmbedFn]:
    """Yield ``pixel_values -> (B, E)`` L2-normalised embeddings for ``model``.

    ``zero_shot=True`` gives the frozen backbone's normalised pooled feature: the adapter is disabled for a PEFT
    model; for :class:`FullFineTuningDML` the backbone is used as it is *now* (call it before training).
    """
    if isinstance(model, PeftModel):
        if zero_shot:
            with model.disable_adapter():
                yield model.embed
        else:
            yield model.embed
        return
    if isinstance(model, FullFineTuningDML):
        if zero_shot:
            pooling = model.settings["pooling"]

            def backbone_feature(pixel_values: torch.Tensor) -> torch.Tensor:
                features = pooled_features(model.backbone, model.backbone_info, pixel_values, pooling)
                return F.normalize(features.float(), dim=-1)

            yield backbone_feature
        else:
            yield model.embed
        return
    raise TypeError(
        f"Expected a PeftModel with a vpdml adapter or a vpdml.FullFineTuningDML, got {type(model).__name__}. "
        "Build one with vpdml.training.build_model(backbone, method, num_classes)."
    )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """Contiguous shard ``[start, stop)`` of this rank and the (padded) rows per rank."""
    per_rank = math.ceil(num_rows / world_size)
    start = min(rank * per_rank, num_rows)
    return start, min(start + per_rank, num_rows), per_rank


def embed_rows(
    embed_fn: EmbedFn,
    dataset: Any,
    transform: Callable[..., torch.Tensor],
    *,
    device: torch.device,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
    desc: str = "embedding",
) -> torch.Tensor:
    """Apply ``embed_fn`` (under ``torch.no_grad`` and the accelerator's autocast) to every image of ``dataset``.

    Returns a float32 CPU tensor with one row per dataset row, in dataset order, on every process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    num_rows = len(dataset)
    if num_rows == 0:
        raise ValueError("Cannot embed an empty dataset.")
    world_size = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    if num_rows < world_size:  # too few images to shard: every process embeds all of them
        world_size, rank = 1, 0
    start, stop, per_rank = _shard_bounds(num_rows, rank, world_size)
    images = DMLTransformDataset(dataset, transform)  # no seed: evaluation transforms are deterministic
    loader = DataLoader(
        Subset(images, range(start, stop)),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    pieces = []
    bar = tqdm(total=stop - start, desc=desc, unit="img", disable=not show_progress or rank != 0, leave=False)
    with torch.no_grad(), autocast, bar:
        for batch in loader:
            pieces.append(embed_fn(batch["pixel_values"].to(device, non_blocking=True)).float().cpu())
            bar.update(len(batch["labels"]))
    local = torch.cat(pieces) if pieces else None
    if world_size == 1:
        assert local is not None
        return local
    return _gather_shards(local, num_rows, per_rank, accelerator)


def _gather_shards(
    local: torch.Tensor | None, num_rows: int, per_rank: int, accelerator: Accelerator
) -> torch.Tensor:
    """Concatenate every rank's shard in rank order (shards are padded to equal size for the collective)."""
    # A rank can hold no rows (e.g. 5 images on 4 ranks); it still has to join the collective with the right
    # width, which it learns from the others.
    width = torch.tensor([local.shape[1] if local is not None else 0], device=accelerator.device)
    width = int(accelerator.gather(width).max())
    padded = torch.zeros(per_rank, width, device=accelerator.device)
    if local is not None:
        padded[: local.shape[0]] = local.to(accelerator.device)
    gathered = accelerator.gather(padded).cpu()
    keep = [
        gathered[rank * per_rank : rank * per_rank + max(0, min(per_rank, num_rows - rank * per_rank))]
        for rank in range(accelerator.num_processes)
    ]
    return torch.cat(keep)


def embed_dataset(
    model: nn.Module,
    dataset: Any,
    transform: Callable[..., torch.Tensor],
    *,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    zero_shot: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
    desc: str = "embedding",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed a ``datasets.Dataset`` with ``image`` and ``label`` columns.

    Args:
        model: a PEFT model with a vpdml adapter, or a :class:`vpdml.FullFineTuningDML`.
        dataset: rows with ``image`` (PIL) and ``label`` (int).
        transform: image -> ``(3, H, W)`` tensor, e.g. the eval transform of
            :func:`vpdml.data.transforms_from_processor`.
        batch_size: images per forward pass (per process).
        accelerator: shard the work over its processes and gather the result (and use its autocast and device).
        zero_shot: embed with the frozen backbone instead of the adapter (see :func:`model_embedder`).

    Returns:
        ``(embeddings, labels)``: float32 ``(N, E)`` L2-normalised rows and int64 ``(N,)`` labels, on the CPU, in
        dataset order, identical on every process. The model is left in the train/eval mode it had.
    """
    device = accelerator.device if accelerator is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with model_embedder(model, zero_shot=zero_shot) as embed_fn:
            embeddings = embed_rows(
                embed_fn,
                dataset,
                transform,
                device=device,
                batch_size=batch_size,
                accelerator=accelerator,
                num_workers=num_workers,
                show_progress=show_progress,
                desc=desc,
            )
    finally:
        model.train(was_training)
    return embeddings, torch.tensor(label_array(dataset), dtype=torch.long)


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
    """Recall@K, MAP@R and R-Precision of one split (see :func:`vpdml.metrics.retrieval_metrics`)."""
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
