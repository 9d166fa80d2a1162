"""Collectives for data-parallel training: gathers with gradients, buffer broadcast, row-sparse gradient reduction."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["all_gather_rows", "all_reduce_row_sparse_gradients", "broadcast_buffers", "exclude_from_ddp"]


def process_count() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(tensor: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order; row counts may differ.

    ``differentiable=True`` keeps the graph: the gradient of each gathered piece is summed over the processes and
    returned to the process that owns it.
    """
    world_size = process_count()
    if world_size == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    if tensor.shape[0] < longest:  # collectives need equal shapes: pad, gather, then cut the padding off
        padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    gathered = _AllGather.apply(tensor) if differentiable else _all_gather(tensor)
    pieces = gathered.split(longest)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.contiguous())
    return torch.cat(pieces)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 with a gradient: each process gets the sum, over all processes' losses, of the
    gradient of its own rows (an all-reduce of the full gradient, then this process's slice)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def last_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct id (so a later rank's row wins, deterministically)."""
    positions = torch.arange(ids.numel(), device=ids.device)
    reversed_ids = ids.flip(0)
    unique, inverse = torch.unique(reversed_ids, return_inverse=True)
    first_in_reversed = torch.full((unique.numel(),), ids.numel(), device=ids.device, dtype=torch.long)
    first_in_reversed = first_in_reversed.scatter_reduce(0, inverse, positions, reduce="amin")
    return ids.numel() - 1 - first_in_reversed


def exclude_from_ddp(module: nn.Module, parameters: list[nn.Parameter]) -> None:
    """Make DDP (created later on ``module``) leave ``parameters`` alone, and give every process rank 0's values
    (DDP's own start-up broadcast skips them)."""
    if not parameters or process_count() == 1:
        return
    names = [name for name, param in module.named_parameters() if any(param is p for p in parameters)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    with torch.no_grad():
        for param in parameters:
            dist.broadcast(param.data, src=0)


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers (semantic-proxy state, negative-sampling seed and step) once, before
    training: DDP's start-up broadcast skips buffers when ``broadcast_buffers=False``, and processes that built
    the model unseeded would otherwise start from different states and draw different negative samples."""
    if process_count() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def all_reduce_row_sparse_gradients(parameters: list[nn.Parameter]) -> None:
    """Average row-sparse gradients over the processes: gather every process's ``(row ids, row values)`` and
    build one coalesced sparse gradient (processes without a gradient contribute nothing)."""
    world_size = process_count()
    if world_size == 1:
        return
    for param in parameters:
        grad = param.grad
        if grad is not None and not grad.is_sparse:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(world_size)
            continue
        if grad is None:
            rows = torch.empty(0, dtype=torch.long, device=param.device)
            values = param.new_zeros((0, *param.shape[1:]))
        else:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        all_rows = all_gather_rows(rows)
        all_values = all_gather_rows(values) / world_size
        param.grad = torch.sparse_coo_tensor(all_rows.unsqueeze(0), all_values, param.shape).coalesce()
