"""BitFit as per-adapter bias offsets.

Instead of training the backbone's biases in place, each adapter owns an offset per bias (zero-initialised)
that a forward hook adds to the module's output. The gradient is the same as training the bias itself, but
the backbone stays untouched: adapters can be switched, disabled and unloaded exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class BiasOffsets(nn.Module):
    """Zero-initialised offsets keyed by canonical bias name (``blocks.3.attn_q``, ``final_norm``...)."""

    def __init__(self, bias_shapes: dict[str, torch.Size]) -> None:
        super().__init__()
        # ParameterDict keys cannot contain dots; "/" keeps the canonical name readable in saved files.
        self.offsets = nn.ParameterDict(
            {name.replace(".", "/"): nn.Parameter(torch.zeros(shape)) for name, shape in bias_shapes.items()}
        )

    def get(self, canonical_name: str) -> torch.Tensor | None:
        key = canonical_name.replace(".", "/")
        return self.offsets.get(key, None)


OffsetLookup = Callable[[str], "torch.Tensor | None"]


def add_bias_offset(output: torch.Tensor, offset: torch.Tensor, *, channels_first: bool) -> torch.Tensor:
    """Add a per-channel offset to a Linear/LayerNorm output (channels last) or a Conv2d output (channels first).

    ``offset`` is ``(D,)`` for the whole batch, or ``(B, D)``: one row per sample (mixed-adapter batches).
    """
    offset = offset.to(output.dtype)
    batch = offset.shape[0] if offset.dim() == 2 else 1
    channels = offset.shape[-1]
    spatial = [1] * (output.dim() - 2)
    if channels_first:
        return output + offset.view(batch, channels, *spatial)
    return output + offset.view(batch, *spatial, channels)


class BiasOffsetHook:
    """The forward hook of one biased module: adds ``lookup(name)``'s offset to its output.

    A small object rather than a closure, so ``copy.deepcopy`` of a model gives hooks that read the copy's
    offsets (a closure would be shared with the original)."""

    def __init__(self, name: str, lookup: OffsetLookup, *, channels_first: bool) -> None:
        self.name = name
        self.lookup = lookup
        self.channels_first = channels_first

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        offset = self.lookup(self.name)
        return None if offset is None else add_bias_offset(output, offset, channels_first=self.channels_first)


def install_bias_hooks(modules: dict[str, nn.Module], lookup: OffsetLookup) -> list[RemovableHandle]:
    """Register one forward hook per biased module; ``lookup(name)`` returns the active offset or None."""
    return [
        module.register_forward_hook(
            BiasOffsetHook(name, lookup, channels_first=isinstance(module, nn.modules.conv._ConvNd))
        )
        for name, module in modules.items()
    ]
