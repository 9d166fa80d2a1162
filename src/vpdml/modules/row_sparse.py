"""Row-sparse parameters: a gather whose gradient names only the rows used, and optimizers that update only them.

A table with one row per class (class prompts, low-rank class codes) is read a batch at a time. Indexing a dense
parameter gives a dense, table-sized gradient, and a dense optimizer then reads and writes every row each step.
Here the gather (:func:`gather_rows`) returns a sparse COO gradient of the parameter's shape holding only the
gathered rows, and :class:`RowSparseAdamW` / :class:`RowSparseSGD` update only those rows, so a step costs
time and memory per *batch class*, not per dataset class. The table may also live in host memory (offload): only
the batch's rows travel to the accelerator, and the optimizer updates the table and its state where they live.

Both optimizers also take ordinary (dense) parameters and update them with PyTorch's own AdamW / SGD code, so one
optimizer serves a whole model. Semantics for rows (see docs/scale.md):

* a row touched at every step follows dense AdamW / SGD exactly, and so does any row under SGD without momentum
  and weight decay (an untouched row does not move in dense SGD either);
* moments are *lazy*: a row's Adam moments and step count (used for the bias correction) or its SGD momentum
  advance only at the steps where the row is in the batch; between them the row does not drift;
* weight decay follows the global clock: a row skipped for k steps is decayed by the product of the k missed
  ``(1 - lr * weight_decay)`` factors in the update of the step that touches it again: the total decay a dense
  optimizer applies, applied late (that step's forward pass sees the row before the catch-up). Rows never
  touched keep their decay pending (``exp(decay_clock - decay_mark)`` in the optimizer state).

``torch.optim.SparseAdam`` is not used: it keeps one step count per *tensor*, so a row first touched at step 1000
gets the bias correction of step 1000 (a first update about 3x too large), and it has no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _dense_adamw
from torch.optim.sgd import sgd as _dense_sgd

#: Optimizer-state entries whose dtype must survive ``load_state_dict`` (PyTorch casts floating state to the
#: parameter's dtype, which would turn step counters into floats and the float64 decay clock into float32).
_EXACT_DTYPE_KEYS = ("row_step", "decay_mark", "decay_clock")


# ---------------------------------------------------------------------------------------------------- gather
class _GatherRows(torch.autograd.Function):
    """``weight[rows]`` moved to ``device``; the gradient is a coalesced sparse COO tensor over ``rows``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.weight_shape = weight.shape
        ctx.weight_device = weight.device
        if weight.device == device:
            return weight.index_select(0, rows)
        # Host -> accelerator: gather into pinned memory so the copy is asynchronous. The caching host allocator
        # keeps the staging block alive until the copy has finished, so it may go out of scope here.
        pinned = device.type == "cuda" and weight.device.type == "cpu"
        staging = torch.empty(
            (rows.shape[0], *weight.shape[1:]), dtype=weight.dtype, device=weight.device, pin_memory=pinned
        )
        torch.index_select(weight, 0, rows, out=staging)
        return staging.to(device, non_blocking=pinned)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        values = grad.to(ctx.weight_device).contiguous()
        sparse = torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, ctx.weight_shape, is_coalesced=True, check_invariants=False
        )
        return sparse, None, None


def gather_rows(weight: torch.Tensor, rows: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``weight[rows]`` on ``device`` (default: ``rows``'s device) with a row-sparse gradient for ``weight``.

    ``rows`` must be unique (e.g. ``torch.unique(labels)``): the gradient is declared coalesced, and a repeated
    row would be counted once. Expand the result by the inverse indices to get one row per sample.
    """
    target = rows.device if device is None else torch.device(device)
    rows = rows.to(weight.device, dtype=torch.long)
    return _GatherRows.apply(weight, rows, target)


# ------------------------------------------------------------------------------------------ parameter lookup
def row_sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` whose gradients are row-sparse (declared by their owners' ``row_sparse_params``).

    A dense optimizer (``torch.optim.AdamW``) rejects their sparse gradients: use :class:`RowSparseAdamW` or
    :class:`RowSparseSGD` for a model that has any, and :func:`clip_grad_norm_` to clip.
    """
    found: list[nn.Parameter] = []
    for submodule in module.modules():
        for name in getattr(submodule, "row_sparse_params", ()):
            param = submodule._parameters.get(name)
            if param is not None and all(param is not p for p in found):
                found.append(param)
    return found


def has_row_sparse_parameters(module: nn.Module, *, trainable_only: bool = True) -> bool:
    """Whether ``module`` holds a row-sparse parameter (by default: one that requires grad)."""
    return any(p.requires_grad or not trainable_only for p in row_sparse_parameters(module))


# ---------------------------------------------------------------------------------------------- optimizers
class _RowSparseOptimizer(Optimizer):
    """Shared bookkeeping: dispatch dense vs row-sparse gradients, the decay clock, dtype-exact state loading."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Ordinary parameters take the dense update, row-sparse ones only update the rows in their gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = [p for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
            sparse = [p for p in group["params"] if p.grad is not None and p.grad.is_sparse]
            if dense:
                self._dense_step(dense, group)
            for param in sparse:
                self._sparse_step(param, group)
        return loss

    def _dense_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _sparse_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _decay_factor(self, group: dict[str, Any]) -> float:
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        if lr * weight_decay >= 1.0:
            raise ValueError(
                f"lr * weight_decay must be < 1 (a decay factor 1 - lr * weight_decay <= 0 erases the weights); "
                f"got lr={lr}, weight_decay={weight_decay}."
            )
        return 1.0 - lr * weight_decay

    def _row_state(self, param: torch.Tensor, moments: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """State of a row-sparse parameter, created on first use where the parameter lives."""
        state = self.state[param]
        if not state:
            for key in moments:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
            rows = param.shape[0]
            state["row_step"] = torch.zeros(rows, dtype=torch.int64, device=param.device)
            # decay_clock: sum over this parameter's steps of log(1 - lr * weight_decay); decay_mark: its value
            # when each row was last brought up to date. exp(clock - mark) is the row's pending decay.
            state["decay_mark"] = torch.zeros(rows, dtype=torch.float64, device=param.device)
            state["decay_clock"] = torch.zeros((), dtype=torch.float64, device=param.device)
        elif "row_step" not in state:
            raise RuntimeError(
                "A parameter that was updated with dense gradients now has a sparse one; a parameter must keep one "
                "gradient layout for the life of the optimizer."
            )
        return state

    def _check_dense_state(self, param: torch.Tensor) -> None:
        if "row_step" in self.state[param]:
            raise RuntimeError(
                "A row-sparse parameter received a dense gradient. Gather its rows with vpdml.modules.row_sparse.gather_rows "
                "(class-prompt tables do) so its gradient stays sparse."
            )

    @staticmethod
    def _coalesced(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, values)`` of a parameter's sparse gradient, duplicates summed (micro-batches accumulate)."""
        grad = param.grad
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"Row-sparse gradients must be sparse along dim 0 only, got sparse_dim={grad.sparse_dim()}."
            )
        if not grad.is_coalesced():
            grad = grad.coalesce()
            param.grad = grad
        return grad.indices()[0], grad.values()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but row counters and the float64 decay clock keep their dtypes."""
        super().load_state_dict(state_dict)
        # Saved ids map to this optimizer's parameters by position, as in Optimizer.load_state_dict.
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        current = [param for group in self.param_groups for param in group["params"]]
        by_id = dict(zip(saved_ids, current, strict=True))
        for index, saved in state_dict["state"].items():
            param = by_id[index]
            for key in _EXACT_DTYPE_KEYS:
                if key in saved:
                    self.state[param][key] = saved[key].to(param.device).clone()


def _row_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(U,)`` per-row tensor reshaped to broadcast over rows of ``like`` (``(U, ...)``), in its dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW for dense parameters (PyTorch's own update, bit for bit) and row-sparse ones (lazy, per-row).

    For a row-sparse parameter, only the rows in the gradient move: each has its own step count for the bias
    correction, so a row's k-th update is the k-th step of an Adam run over its own gradients; decoupled weight
    decay is applied with the global clock (see the module docstring). State entries are tensors only.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        _check_hyperparameters(lr=lr, eps=eps, weight_decay=weight_decay)
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}.")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _dense_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        for param in params:
            self._check_dense_state(param)
            state = self.state[param]
            if not state:  # the same layout as torch.optim.AdamW, so dense state is interchangeable with it
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        _dense_adamw(
            params,
            [p.grad for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [],
            [self.state[p]["step"] for p in params],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            maximize=False,
        )

    def _sparse_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self._row_state(param, ("exp_avg", "exp_avg_sq"))
        lr, eps = float(group["lr"]), float(group["eps"])
        beta1, beta2 = group["betas"]
        state["decay_clock"] += math.log(self._decay_factor(group))
        rows, grad = self._coalesced(param)
        if rows.numel() == 0:
            return
        state["row_step"].index_add_(0, rows, torch.ones_like(rows))
        steps = state["row_step"].index_select(0, rows).to(torch.float64)
        weight = param.index_select(0, rows)
        # Pending decay of the skipped steps and this step's decay, as a dense AdamW would have applied them.
        weight.mul_(
            _row_view(torch.exp(state["decay_clock"] - state["decay_mark"].index_select(0, rows)), weight)
        )
        state["decay_mark"].index_copy_(0, rows, state["decay_clock"].expand(rows.shape[0]).contiguous())
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        exp_avg_sq = (
            state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        )
        # The same arithmetic as torch's AdamW, with per-row bias corrections in place of scalars.
        step_size = _row_view(lr / (1 - torch.pow(beta1, steps)), weight)
        correction2_sqrt = _row_view(torch.sqrt(1 - torch.pow(beta2, steps)), weight)
        denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
        weight.sub_(step_size * exp_avg / denom)
        param.index_copy_(0, rows, weight)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)


class RowSparseSGD(_RowSparseOptimizer):
    """SGD (momentum, dampening, Nesterov, L2 weight decay) for dense and row-sparse parameters.

    Dense parameters get PyTorch's own SGD update. A row-sparse row touched at every step follows it exactly, and
    so does every row without momentum and weight decay. With momentum, a row's buffer advances only when the row
    is in the batch (lazy momentum); the decay of skipped steps is caught up at the next touch.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        _check_hyperparameters(lr=lr, eps=0.0, weight_decay=weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0.")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)

    def _dense_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        for param in params:
            self._check_dense_state(param)
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        _dense_sgd(
            params,
            [p.grad for p in params],
            buffers,
            weight_decay=float(group["weight_decay"]),
            momentum=float(group["momentum"]),
            lr=float(group["lr"]),
            dampening=float(group["dampening"]),
            nesterov=bool(group["nesterov"]),
            maximize=False,
        )
        if group["momentum"] != 0:  # the functional form creates buffers on the first step: keep them
            for param, buffer in zip(params, buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer

    def _sparse_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        momentum = float(group["momentum"])
        state = self._row_state(param, ("momentum_buffer",) if momentum else ())
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        clock_before = state["decay_clock"].clone()
        state["decay_clock"] += math.log(self._decay_factor(group))
        rows, grad = self._coalesced(param)
        if rows.numel() == 0:
            return
        weight = param.index_select(0, rows)
        # Decay of the skipped steps only: this step's decay enters through the L2 term, as in torch's SGD.
        weight.mul_(_row_view(torch.exp(clock_before - state["decay_mark"].index_select(0, rows)), weight))
        state["decay_mark"].index_copy_(0, rows, state["decay_clock"].expand(rows.shape[0]).contiguous())
        if weight_decay:
            grad = grad.add(weight, alpha=weight_decay)
        if momentum:
            first = (state["row_step"].index_select(0, rows) == 0).view(-1, *([1] * (grad.dim() - 1)))
            buffer = state["momentum_buffer"].index_select(0, rows)
            advanced = buffer.mul_(momentum).add_(grad, alpha=1 - float(group["dampening"]))
            buffer = torch.where(first, grad, advanced)  # torch's SGD starts a buffer at the raw gradient
            state["momentum_buffer"].index_copy_(0, rows, buffer)
            grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        state["row_step"].index_add_(0, rows, torch.ones_like(rows))
        weight.add_(grad, alpha=-lr)
        param.index_copy_(0, rows, weight)


def _check_hyperparameters(*, lr: float, eps: float, weight_decay: float) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")


# ------------------------------------------------------------------------------------------------ clipping
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also accepts row-sparse gradients (torch's raises on them).

    Without sparse gradients this *is* torch's function. With them, the total norm is taken over the dense
    gradients and the values of the (coalesced) sparse ones, on the first gradient's device.
    """
    params = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(
            params, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
        )
    pieces = []
    for param in params:
        if param.grad.is_sparse:
            _RowSparseOptimizer._coalesced(param)  # a row's duplicates must be summed before taking the norm
            pieces.append(param.grad.values())
        else:
            pieces.append(param.grad)
    device = pieces[0].device
    norms = torch.stack([torch.linalg.vector_norm(g.float(), norm_type).to(device) for g in pieces])
    total = torch.linalg.vector_norm(norms, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} of the gradients is non-finite ({total}).")
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for piece in pieces:
        piece.mul_(
            coefficient.to(piece.device, piece.dtype)
        )  # sparse: the values tensor is the gradient's own
    return total
