"""The embedding head: LayerNorm -> Linear -> L2-normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Maps a backbone feature (D) to a unit-norm embedding (E).

    Xavier-uniform weights and zero bias, as in the paper; a fresh LayerNorm re-centres the frozen
    backbone's feature for the new task.
    """

    def __init__(self, hidden_size: int, embedding_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.proj = nn.Linear(hidden_size, embedding_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The head runs in float32 even under autocast: normalisation of low-precision outputs loses the
        # small cosine differences that retrieval ranks on.
        with torch.autocast(device_type=features.device.type, enabled=False):
            projected = self.proj(self.norm(features.float()))
        return F.normalize(projected, dim=-1)
