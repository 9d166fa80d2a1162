"""``prompt_init="token_mean"``: start the shared prompts from the tokens the frozen backbone already sees.

VPT's random prompts are extra tokens every patch attends to; before any training they move the frozen features
(on the offline emoji benchmark, one random prompt per layer cost 0.016-0.039 zero-shot R@1, depending on the
draw: bench/prompt_init.py), and a short run does not repair that. A prompt equal to the mean patch token its block receives is a token the block has,
in effect, already seen, so the prompted backbone starts close to the frozen one (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from vpdml.models.protocol import PeftDMLModel, as_dml_model
from vpdml.retrieval.embed import embed_rows
from vpdml.training.args import TrainingArguments

__all__ = ["PROMPT_INIT_IMAGES", "init_prompts_from_data"]

#: Training images averaged for the token means: enough for a stable mean of thousands of patch tokens, a few
#: seconds of forward passes.
PROMPT_INIT_IMAGES = 256


def init_prompts_from_data(
    model: nn.Module,
    dataset: Any,
    transform: Callable[..., torch.Tensor],
    args: TrainingArguments,
    *,
    accelerator: Accelerator | None = None,
) -> bool:
    """Centre the active adapter's prompts on the mean block tokens of up to :data:`PROMPT_INIT_IMAGES` training
    images (chosen with ``args.seed``): the shared prompts when its config asks for ``prompt_init="token_mean"``,
    the class prompts when it asks for ``class_prompt_init="token_mean"``.

    Every process computes the same means (``embed_rows`` gathers the rows), so the prompts stay identical.

    Returns:
        Whether the prompts were set.
    """
    dml = as_dml_model(model)
    if not isinstance(dml, PeftDMLModel):
        return False
    config = dml.config
    shared = config.prompt_init == "token_mean" and any(dml.tuner.vpdml_prompts[dml.adapter].counts)
    classes = (
        config.class_prompt_init == "token_mean"
        and config.uses_semantic_proxies
        and dml.proxy_bank is not None
    )
    if not (shared or classes):
        return False
    count = min(len(dataset), PROMPT_INIT_IMAGES)
    rows = np.sort(np.random.default_rng(args.seed).choice(len(dataset), size=count, replace=False))
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        per_image = embed_rows(
            lambda pixels: dml.tuner.mean_block_tokens(pixels).flatten(1),
            dataset.select(rows.tolist()),
            transform,
            device=device,
            batch_size=args.eval_batch_size,
            accelerator=accelerator,
            show_progress=args.show_progress,
            desc="prompt init",
        )
    finally:
        model.train(was_training)
    info = dml.tuner.backbone_info
    token_means = per_image.mean(dim=0).view(info.num_layers, info.hidden_size)
    if shared:
        dml.tuner.center_prompts(token_means)
    if classes:
        dml.proxy_bank.class_prompts.center_on(token_means)
    return True
