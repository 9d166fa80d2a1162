"""Embed image datasets with a trained (or zero-shot) model and score retrieval on class-disjoint splits.

Works for a PEFT model with a vpdml adapter and for :class:`vpdml.FullFineTuningDML`. With an ``accelerate``
``Accelerator`` of several processes, every process embeds a contiguous shard of the images and the shards are
gathered back in dataset order, so every process ends with the same ``(N, E)`` matrix and the same metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from vpdml.data import DMLTransformDataset, collate, label_array
from vpdml.models.protocol import as_dml_model

__all__ = ["embed_dataset"]

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def model_embedder(model: nn.Module, *, zero_shot: bool = False) -> Iterator[EmbedFn]:
    """Yield ``pixel_values -> (B, E)`` L2-normalised embeddings for ``model``.

    ``zero_shot=True`` gives the frozen backbone's normalised pooled feature: the adapter is disabled for a PEFT
    model; for :class:`FullFineTuningDML` the backbone is used as it is *now* (call it before training).
    """
    dml = as_dml_model(model)
    if zero_shot:
        with dml.zero_shot() as embed_fn:
            yield embed_fn
    else:
        yield dml.embed


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
