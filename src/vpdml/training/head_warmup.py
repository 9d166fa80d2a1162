"""Head warm-up: train the embedding head and the learnable proxies on cached backbone features.

Small DML data sets need many epochs; an epoch over cached features costs one matrix product per
batch instead of a backbone pass, so a few dozen of them are a cheap warm start before the prompts are trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from vpdml.data import ClassBalancedBatchSampler, label_array
from vpdml.models.protocol import as_dml_model
from vpdml.modules.row_sparse import RowSparseAdamW, has_row_sparse_parameters
from vpdml.proxies.loss import proxy_loss
from vpdml.retrieval.embed import embed_rows
from vpdml.training.args import TrainingArguments

__all__ = ["cache_head_inputs", "warm_up_head"]


def cache_head_inputs(
    model: nn.Module,
    dataset: Any,
    transform: Callable[..., torch.Tensor],
    *,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """The features the embedding head receives for every image (with the adapter's current prompts/BitFit)."""
    head = as_dml_model(model).head
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach())

    def head_input(pixel_values: torch.Tensor) -> torch.Tensor:
        captured.clear()
        model.embed(pixel_values)
        return captured[-1].float()

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    handle = head.register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    try:
        return embed_rows(
            head_input,
            dataset,
            transform,
            device=device,
            batch_size=batch_size,
            accelerator=accelerator,
            show_progress=show_progress,
            desc="caching features",
        )
    finally:
        handle.remove()
        model.train(was_training)


def warm_up_head(
    model: nn.Module,
    dataset: Any,
    transform: Callable[..., torch.Tensor],
    args: TrainingArguments,
    *,
    accelerator: Accelerator | None = None,
) -> list[float]:
    """Train only the embedding head and the learnable proxies, on cached backbone features; then start the
    semantic branch from data where the config asks for it (``semantic_proxy_init="class_means"``,
    ``proxy_head_init="embedding_head"``).

    Small DML data sets need many epochs; epochs over cached features cost a matrix product each, so
    this is a cheap warm start before prompts are trained. Batches are class-balanced like the main loop's;
    Proxy Anchor uses the learnable proxies alone (the semantic-proxy branch needs the backbone). Every process
    runs the same deterministic computation on the same gathered features, so they stay identical.

    Returns:
        The mean loss of each warm-up epoch.
    """
    features = cache_head_inputs(
        model,
        dataset,
        transform,
        batch_size=args.eval_batch_size,
        accelerator=accelerator,
        show_progress=args.show_progress,
    )
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    features = features.to(device)
    labels = torch.tensor(label_array(dataset), dtype=torch.long, device=device)
    dml = as_dml_model(model)
    head, bank, settings = dml.head, dml.proxy_bank, dml.loss_settings
    if bank is None:
        raise ValueError("The model has no learnable proxies: build it with num_classes=<training classes>.")
    weights = [p for p in head.parameters() if p.ndim >= 2]
    others = [p for p in head.parameters() if p.ndim < 2]
    # Sampled negatives make the proxies' gradient row-sparse, which torch's AdamW refuses.
    optimizer_class = RowSparseAdamW if has_row_sparse_parameters(bank) else torch.optim.AdamW
    optimizer = optimizer_class(
        [
            {"params": weights, "weight_decay": args.weight_decay},
            {"params": others, "weight_decay": 0.0},
            {"params": [bank.learnable], "lr": args.proxy_learning_rate, "weight_decay": 0.0},
        ],
        lr=args.head_warmup_learning_rate,
    )
    with warnings.catch_warnings():  # the main sampler already warned about small classes
        warnings.simplefilter("ignore")
        sampler = ClassBalancedBatchSampler(
            labels.cpu().numpy(), args.classes_per_batch, args.samples_per_class, seed=args.seed
        )
    was_training = head.training
    head.train()
    losses = []
    bar = tqdm(
        range(args.head_warmup_epochs),
        desc="head warm-up",
        unit="epoch",
        disable=not args.show_progress or (accelerator is not None and not accelerator.is_local_main_process),
    )
    for epoch in bar:
        sampler.set_epoch(epoch)
        total, batches = 0.0, 0
        for indices in sampler:
            index = torch.as_tensor(indices, device=device)
            proxies = bank.loss_proxies(labels[index], learnable_only=True)
            loss = proxy_loss(head(features[index]), labels[index], proxies, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        losses.append(total / max(batches, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    head.train(was_training)
    if bank.needs_data_init:  # the semantic branch starts from the warmed-up head and the cached features
        bank.initialize_from_data(head, features, labels)
    return losses
