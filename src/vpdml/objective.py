"""The training objective as a module: ``forward(pixel_values, labels) -> loss``, the same on 1 or N processes.

``accelerate`` wraps what it prepares in ``DistributedDataParallel``, which needs the loss to come out of a
module's ``forward``; a PEFT model's ``forward`` runs the backbone, not the DML loss. :class:`DMLObjective` is that
module.

Several processes (data parallel, each with its share of whole classes of a global batch ``P x m``):

* **Global-batch Proxy Anchor.** Proxy Anchor's negative term is ``log(1 + sum over the batch)`` per proxy: it
  does not split into per-process losses. Every process therefore gathers the batch's embeddings (with their
  graph, through ``torch.distributed.nn.functional.all_gather``) and the proxy rows of its classes (which carry
  this step's semantic-proxy update), and computes the loss of the whole global batch. Gradients flowing back
  through the gather reach the process that owns each sample; after DDP averages, every parameter's gradient is
  the gradient of the one-process loss on the same global batch (up to floating-point summation order).
* **Row-sparse class prompts** (``class_prompt_storage`` ``"sparse"``/``"low_rank"``) have sparse gradients,
  which DDP cannot reduce: :func:`exclude_from_ddp` takes them out of DDP, and after each backward pass that
  ends an accumulation :func:`all_reduce_row_sparse_gradients` gathers every process's ``(rows, values)`` and
  averages them, as DDP does for dense gradients.
* **Semantic-proxy state.** The per-class state ``P`` (a buffer, no gradient) is updated in the forward pass from
  the process's own classes. Right after, every process all-gathers ``(class ids, updated rows)`` and writes
  them, so ``P`` stays identical everywhere. The sampler puts distinct classes on the processes of a global
  batch, so the merged state is exactly what one process computes on the global batch; should two processes
  ever share a class, the row of the highest rank wins (deterministically). DDP's own buffer broadcast is
  switched off by the trainer (it would overwrite every rank's rows with rank 0's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from .full_finetune import FullFineTuningDML
from .losses import proxy_anchor_loss
from .proxies import ProxyBank

__all__ = [
    "DMLObjective",
    "all_gather_rows",
    "all_reduce_row_sparse_gradients",
    "broadcast_buffers",
    "exclude_from_ddp",
    "proxy_bank_of",
]


@dataclass
class _LossInputs:
    embeddings: torch.Tensor
    bank: ProxyBank
    semantic_rows: tuple[torch.Tensor, torch.Tensor] | None
    settings: dict[str, Any]


def proxy_bank_of(model: nn.Module) -> ProxyBank | None:
    """The :class:`ProxyBank` (learnable proxies, semantic-proxy state) of the model's active adapter."""
    if isinstance(model, PeftModel):
        tuner = model.base_model
        adapter = tuner._resolve_adapter(None)
        return tuner.dml_proxies[adapter] if adapter in tuner.dml_proxies else None  # noqa: SIM401 (ModuleDict has no .get)
    if isinstance(model, FullFineTuningDML):
        return model.proxies
    return None


def loss_settings(model: nn.Module) -> dict[str, Any]:
    """Proxy Anchor ``scale``, ``margin`` and ``positive_average`` of a model."""
    if isinstance(model, PeftModel):
        config = model.peft_config[model.base_model._resolve_adapter(None)]
        scale, margin = config.proxy_anchor_scale, config.proxy_anchor_margin
        average = config.proxy_anchor_positive_average
    elif isinstance(model, FullFineTuningDML):
        scale, margin = model.settings["proxy_anchor_scale"], model.settings["proxy_anchor_margin"]
        average = model.settings["proxy_anchor_positive_average"]
    else:
        raise TypeError(f"Expected a PeftModel or FullFineTuningDML, got {type(model).__name__}.")
    return {"scale": scale, "margin": margin, "positive_average": average}


def _loss_inputs(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> _LossInputs:
    """Embeddings, the proxy bank and this step's semantic-proxy rows (with their graph) of the local batch."""
    bank = proxy_bank_of(model)
    if bank is None:
        raise ValueError("The model has no proxies: build it with num_classes=<number of training classes>.")
    if isinstance(model, PeftModel):
        outputs = model.dml_forward(pixel_values, labels)
        return _LossInputs(outputs.embeddings, bank, outputs.semantic_rows, loss_settings(model))
    if isinstance(model, FullFineTuningDML):
        return _LossInputs(model.embed(pixel_values), bank, None, loss_settings(model))
    raise TypeError(f"Expected a PeftModel or FullFineTuningDML, got {type(model).__name__}.")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(tensor: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order; row counts may differ.

    ``differentiable=True`` keeps the graph: the gradient of each gathered piece is summed over the processes and
    returned to the process that owns it.
    """
    world_size = _world_size()
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


def _last_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct id (so a later rank's row wins, deterministically)."""
    positions = torch.arange(ids.numel(), device=ids.device)
    reversed_ids = ids.flip(0)
    unique, inverse = torch.unique(reversed_ids, return_inverse=True)
    first_in_reversed = torch.full((unique.numel(),), ids.numel(), device=ids.device, dtype=torch.long)
    first_in_reversed = first_in_reversed.scatter_reduce(0, inverse, positions, reduce="amin")
    return ids.numel() - 1 - first_in_reversed


class DMLObjective(nn.Module):
    """``forward(pixel_values, labels)`` -> Proxy-Anchor loss of the *global* batch (see the module docstring).

    Holds the model as ``self.model``; ``accelerator.unwrap_model(prepared).model`` gives it back.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, PeftModel | FullFineTuningDML):
            raise TypeError(
                f"DMLObjective needs a PeftModel with a vpdml adapter or a FullFineTuningDML, got "
                f"{type(model).__name__}."
            )
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        inputs = _loss_inputs(self.model, pixel_values, labels)
        if _world_size() == 1:
            proxies = inputs.bank.loss_proxies(labels, inputs.semantic_rows)
            return proxy_anchor_loss(
                inputs.embeddings, labels, proxies.proxies, **inputs.settings, **proxies.loss_kwargs()
            )
        local_classes = torch.unique(labels)
        self._synchronise_semantic_state(local_classes)
        embeddings = all_gather_rows(inputs.embeddings, differentiable=True)
        all_labels = all_gather_rows(labels)
        # Every process builds the proxies of the global batch (sampled negatives: the same sample everywhere, a
        # function of the global batch's classes and the step). This step's rows of the batch classes live on the
        # process that updated them: gather them (with their graph) and put them in place.
        proxies = inputs.bank.loss_proxies(all_labels, inputs.semantic_rows)
        classes = all_gather_rows(local_classes)
        rows = all_gather_rows(proxies.proxies[proxies.rows_of(local_classes)], differentiable=True)
        keep = _last_occurrence(classes)
        merged = proxies.proxies.index_put((proxies.rows_of(classes[keep]),), rows[keep])
        return proxy_anchor_loss(embeddings, all_labels, merged, **inputs.settings, **proxies.loss_kwargs())

    @torch.no_grad()
    def _synchronise_semantic_state(self, local_classes: torch.Tensor) -> None:
        """Give every process the state rows the others just updated (training mode only)."""
        bank = proxy_bank_of(self.model)
        if bank is None or not bank.uses_semantic_proxies or not self.training:
            return
        classes = all_gather_rows(local_classes)
        rows = all_gather_rows(bank.semantic_state[local_classes])
        keep = _last_occurrence(classes)
        bank.semantic_state[classes[keep]] = rows[keep]


def exclude_from_ddp(module: nn.Module, parameters: list[nn.Parameter]) -> None:
    """Make DDP (created later on ``module``) leave ``parameters`` alone, and give every process rank 0's values
    (DDP's own start-up broadcast skips them)."""
    if not parameters or _world_size() == 1:
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
    if _world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def all_reduce_row_sparse_gradients(parameters: list[nn.Parameter]) -> None:
    """Average row-sparse gradients over the processes: gather every process's ``(row ids, row values)`` and
    build one coalesced sparse gradient (processes without a gradient contribute nothing)."""
    world_size = _world_size()
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
