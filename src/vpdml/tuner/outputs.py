"""What the tuner's training-time forward passes return."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DMLForwardOutput:
    """A batch's pass through the model before the loss (:meth:`VisualPromptDMLModel.dml_forward`)."""

    embeddings: torch.Tensor
    #: the proxy head's outputs of the proxy pass (VPTSP), one per image re-encoded with its class prompts
    semantic_embeddings: torch.Tensor | None = None
    #: ``(classes, rows)``: this step's semantic-proxy state of the batch's classes, with its graph
    semantic_rows: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class DMLLossOutput:
    """What :meth:`VisualPromptDMLModel.dml_loss` computed, for logging and tests."""

    loss: torch.Tensor
    embeddings: torch.Tensor
    #: the normalised proxies scored against: ``(C, E)``, or ``(S, E)`` for ``proxy_classes`` (sampled negatives)
    proxies: torch.Tensor
    semantic_embeddings: torch.Tensor | None = None
    proxy_classes: torch.Tensor | None = None
