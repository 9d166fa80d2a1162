"""BitFit as per-adapter bias offsets.

Instead of training the backbone's biases in place, each adapter owns an offset per bias (zero-initialised) that
joins the module's bias in its forward (:class:`BiasOffsetForward`). The gradient is the same as training the bias
itself, but the backbone stays untouched: adapters can be switched, disabled and unloaded exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


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


#: module types whose own bias the offset can join, so one fused op adds both (their forward is re-done here)
_FUSABLE = (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class BiasOffsetForward:
    """The forward of one biased module while an adapter's offsets apply to it.

    With one ``(D,)`` offset for the whole batch, a Linear, LayerNorm or Conv runs with ``bias + offset`` as its bias:
    the offset costs nothing on top of the bias the op adds anyway, where adding it to the output would read and
    write the whole output once more (about 6% of a ViT training step). Per-sample ``(B, D)`` offsets (mixed-adapter
    batches) and other module types get the offset added to their output.

    Installed as the module's instance attribute ``forward``, so the module tree, its state dict and its hooks stay
    as they are. A forward already set on the instance (accelerate's offloading hooks) is kept and called, with the
    offset added to its output. A small object rather than a closure, so ``copy.deepcopy`` of a model gives forwards
    that read the copy's module and offsets.
    """

    def __init__(self, module: nn.Module, name: str, lookup: OffsetLookup) -> None:
        self.module = module
        self.name = name
        self.lookup = lookup
        self.inner = module.__dict__.get("forward")
        self.channels_first = isinstance(module, nn.modules.conv._ConvNd)
        # exact types (a subclass may compute something else), reading weights nobody else manages
        self.fusable = self.inner is None and type(module) in _FUSABLE
        self.active = True

    def __call__(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        offset = self.lookup(self.name) if self.active else None
        if offset is None:
            return self._own_forward(input, *args, **kwargs)
        if self.fusable and offset.dim() == 1 and not args and not kwargs:
            return _forward_with_bias(module, input, module.bias + offset.to(module.bias.dtype))
        output = self._own_forward(input, *args, **kwargs)
        return add_bias_offset(output, offset, channels_first=self.channels_first)

    def _own_forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inner is not None:
            return self.inner(input, *args, **kwargs)
        return type(self.module).forward(self.module, input, *args, **kwargs)

    def remove(self) -> None:
        """Stop adding offsets and give the module its forward back (if something wrapped this forward since, it
        keeps calling it, which then adds nothing)."""
        self.active = False
        if self.module.__dict__.get("forward") is self:
            if self.inner is None:
                del self.module.forward
            else:
                self.module.forward = self.inner


def _forward_with_bias(module: nn.Module, input: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(input, module.weight, bias)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(input, module.normalized_shape, module.weight, bias, module.eps)
    return module._conv_forward(input, module.weight, bias)


def install_bias_offsets(modules: dict[str, nn.Module], lookup: OffsetLookup) -> list[BiasOffsetForward]:
    """Give each biased module a forward that applies ``lookup(name)``'s offset (None: the module's own output).

    Call ``.remove()`` on each returned object to restore the modules."""
    installed = []
    for name, module in modules.items():
        forward = BiasOffsetForward(module, name, lookup)
        module.forward = forward
        installed.append(forward)
    return installed
