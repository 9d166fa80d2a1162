"""Optimizer parameter groups, optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from vpdml.modules.row_sparse import (
    RowSparseAdamW,
    RowSparseSGD,
    has_row_sparse_parameters,
)
from vpdml.training.args import TrainingArguments

__all__ = ["cosine_factor", "create_optimizer", "create_scheduler", "fused_adamw", "parameter_groups"]
# Parameter names that hold tokens rather than weights: never weight-decayed (decay would pull them to "absent").
_TOKEN_PARAMETER_MARKERS = ("prompts", "cls_token", "position_embeddings", "mask_token", "register_tokens")


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def _is_learnable_proxy(name: str) -> bool:
    return name.endswith("learnable") and ("dml_proxies." in name or name.startswith("proxies."))


def _is_prompt(name: str) -> bool:
    # Shared visual prompts (``...prompts.layer_3``) and class prompts (``...class_prompts.weight``, or the
    # sparse / low-rank tables' rows, basis and codes) all live under a module whose name ends in "prompts".
    return "prompts." in name and not _is_learnable_proxy(name)


def parameter_groups(model: nn.Module, args: TrainingArguments) -> list[dict[str, Any]]:
    """Optimizer groups: weight matrices (``learning_rate``, ``weight_decay``), other trainable tensors
    (``learning_rate``, no decay: biases, norms, BitFit offsets, prompts and tokens), the learnable proxies
    (``proxy_learning_rate``, no decay) and, only when ``prompt_learning_rate`` is set, the prompt tokens
    (``prompt_learning_rate``, no decay). Empty groups are left out; the order is deterministic, and a run
    without ``prompt_learning_rate`` has the groups (and so the optimizer state layout) it always had."""
    decay, no_decay, proxies, prompts = [], [], [], []
    separate_prompts = args.prompt_learning_rate is not None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_learnable_proxy(name):
            proxies.append(param)
        elif separate_prompts and _is_prompt(name):
            prompts.append(param)
        elif param.ndim >= 2 and not any(marker in name for marker in _TOKEN_PARAMETER_MARKERS):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "lr": args.learning_rate, "weight_decay": args.weight_decay},
        {"params": no_decay, "lr": args.learning_rate, "weight_decay": 0.0},
        {"params": proxies, "lr": args.proxy_learning_rate, "weight_decay": 0.0},
        {"params": prompts, "lr": args.prompt_learning_rate, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError(
            "The model has no trainable parameters: is the adapter active and not in inference mode?"
        )
    return groups


def create_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`parameter_groups`.

    A model with row-sparse parameters (class prompts stored ``"sparse"`` or ``"low_rank"``, see
    :mod:`vpdml.proxies.class_prompts`, or learnable proxies with ``proxy_negatives``) gets
    :class:`vpdml.modules.row_sparse.RowSparseAdamW` / ``RowSparseSGD``, which update only the rows in the gradient (the
    batch's classes, the sampled proxies) and apply PyTorch's own update to every dense parameter.
    """
    groups = parameter_groups(model, args)
    if has_row_sparse_parameters(model):
        if args.optimizer == "sgd":
            return RowSparseSGD(groups, lr=args.learning_rate, momentum=args.momentum)
        return RowSparseAdamW(groups, lr=args.learning_rate)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
    return fused_adamw(groups, lr=args.learning_rate)


def fused_adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with ``fused=True`` where the parameters' device has the fused kernel (CPU, CUDA...),
    else the standard one.

    The fused kernel updates every tensor in one pass; the per-tensor loop PyTorch uses on CPU by default reads and
    writes each tensor about ten times, which costs 2-3% of a VPTSP-G step (its class-prompt table and GRU). The
    result differs from the loop's by float rounding only. transformers' Trainer defaults to it too.
    """
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int, steps_per_epoch: int
) -> Any:
    """transformers' schedules; a cosine with its own length or a floor is :func:`cosine_factor` per group."""
    if args.lr_scheduler == "cosine" and (args.lr_cosine_epochs is not None or args.lr_min > 0):
        length = total_steps
        if args.lr_cosine_epochs is not None:
            length = max(round(args.lr_cosine_epochs * steps_per_epoch), 1)
        factors = [
            functools.partial(
                cosine_factor,
                warmup_steps=args.warmup_steps,
                cosine_steps=length,
                # the official recipes' eta_min is one absolute rate for every group, so as a fraction it differs
                floor=min(args.lr_min / group["lr"], 1.0) if group["lr"] > 0 else 0.0,
            )
            for group in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    from transformers import get_scheduler

    name = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)


def cosine_factor(step: int, *, warmup_steps: int, cosine_steps: int, floor: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then ``floor + (1 - floor) * (1 + cos(pi t)) / 2``
    with ``t`` going from 0 to 1 over ``cosine_steps`` (warm-up included) and held at 1 after (PyTorch's
    ``CosineAnnealingLR`` would climb back up)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min((step - warmup_steps) / max(1, cosine_steps - warmup_steps), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
