"""The tuner layer: a transformer block that sees extra prompt tokens.

Each wrapped block asks a shared :class:`PromptRouter` which prompts to use for the current forward pass:
the active adapter's shared prompts (embedding), the batch's class prompts (semantic-proxy pass), or none
(adapter disabled). Every layer gets fresh prompts and their outputs are dropped after the block (VPT-deep), so
by default a block runs on the image tokens alone and the prompts enter its attention as keys and values only
(:mod:`vpdml.tuner.prompt_keys`). Where that does not apply (a transformers 4.x block, an attention mask,
attention dropout in training, hooks on the attention module) or when ``PromptRouter.prompts_as_keys`` is off,
the prompts are appended after the image tokens and sliced off after the block. Appending rather than inserting
after CLS is exact: a ViT block is permutation-equivariant over tokens (positions were added before the first
block, there is no causal mask).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from vpdml.tuner.prompt_keys import PROMPT_TOKENS_KWARG, unwrap_attention, wrap_attention

#: ``provider(layer_index, batch_size) -> (B, n, D) prompts or None``.
PromptProvider = Callable[[int, int], "torch.Tensor | None"]


class SharedTrunk:
    """The leading blocks the proxy pass shares with the sample pass.

    During the sample pass, block ``layers - 1`` records its output. :meth:`select` keeps the rows of the images
    the proxy pass re-encodes; during the proxy pass, blocks ``0 .. layers - 1`` then return those rows instead of
    computing (so the encoder hands them on to block ``layers``). The recorded rows stay in the sample pass's
    autograd graph: the proxy pass's gradient reaches the shared prompts and biases of the trunk.
    """

    def __init__(self, layers: int) -> None:
        if layers < 1:
            raise ValueError(f"A shared trunk needs at least one block, got {layers}.")
        self.layers = layers
        self.output: Any = None
        self.replaying = False

    def record(self, layer_index: int, output: Any) -> None:
        if layer_index == self.layers - 1:
            self.output = output

    def select(self, rows: torch.Tensor) -> None:
        """Keep the recorded hidden states of ``rows`` (the proxy pass's images) and switch to replaying them."""
        if self.output is None:
            raise RuntimeError("The sample pass did not reach the end of the shared trunk.")
        if isinstance(self.output, tuple):
            self.output = (self.output[0][rows], *self.output[1:])
        else:
            self.output = self.output[rows]
        self.replaying = True


class TokenSubset:
    """A random share of each image's patch tokens, kept from block ``first_layer`` on (the proxy pass's first
    computing block); the prefix tokens (CLS, distillation, registers) always stay.

    Each image draws its own subset from torch's global generator, so seeded runs repeat and resumed runs (which
    restore the generator) continue exactly. The order of the kept tokens does not matter: positions were added
    before the first block and a ViT block is permutation-equivariant over tokens.
    """

    def __init__(self, fraction: float, num_prefix_tokens: int, first_layer: int) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"The share of patch tokens kept must be in (0, 1], got {fraction}.")
        self.fraction = fraction
        self.num_prefix_tokens = num_prefix_tokens
        self.first_layer = first_layer

    def keep(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = hidden_states.shape
        patches = tokens - self.num_prefix_tokens
        kept = max(round(self.fraction * patches), 1)
        if kept >= patches:
            return hidden_states
        order = torch.rand(batch, patches, device=hidden_states.device).argsort(dim=1)[:, :kept]
        index = (order + self.num_prefix_tokens).unsqueeze(-1).expand(-1, -1, dim)
        chosen = hidden_states.gather(1, index)
        return torch.cat([hidden_states[:, : self.num_prefix_tokens], chosen], dim=1)


class PromptRouter:
    """Plain object shared by all prompted blocks of one backbone: who provides prompts right now."""

    def __init__(self) -> None:
        self.provider: PromptProvider | None = None
        self.trunk: SharedTrunk | None = None
        self.token_subset: TokenSubset | None = None
        #: prompts enter attention as keys and values only (False: they are full tokens whose outputs every block
        #: computes and drops, as in VPT's and the official VPTSP code; same result up to float rounding)
        self.prompts_as_keys = True

    def prompts(self, layer_index: int, batch_size: int) -> torch.Tensor | None:
        return None if self.provider is None else self.provider(layer_index, batch_size)

    @contextmanager
    def providing(self, provider: PromptProvider | None) -> Iterator[None]:
        """Route ``provider``'s prompts (None: no prompts) for the duration of a ``with``."""
        with self._setting("provider", provider):
            yield

    @contextmanager
    def subsetting(self, subset: TokenSubset | None) -> Iterator[None]:
        """Keep ``subset``'s share of patch tokens for the duration of one backbone pass (None: every token)."""
        with self._setting("token_subset", subset):
            yield

    @contextmanager
    def sharing(self, trunk: SharedTrunk | None) -> Iterator[None]:
        """Record (sample pass) or replay (proxy pass) ``trunk`` for the duration of one backbone pass (None: every
        block computes)."""
        with self._setting("trunk", trunk):
            yield

    @contextmanager
    def _setting(self, name: str, value: Any) -> Iterator[None]:
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)


class PromptedBlock(nn.Module, BaseTunerLayer):
    """Wraps one transformer block; owns no parameters (prompts live on the tuner, keyed by adapter)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, layer_index: int, router: PromptRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self._router = router
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter: str | list[str] = "default"
        # kept out of nn.Module's registry: the wrapper already sits in the block's own module tree
        self.__dict__["_prompt_keys"] = wrap_attention(base_layer)

    def release(self) -> nn.Module:
        """The wrapped block with its own attention module back in place."""
        if self._prompt_keys is not None:
            unwrap_attention(self.base_layer, self._prompt_keys)
            self.__dict__["_prompt_keys"] = None
        return self.base_layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        subset = self._router.token_subset
        if subset is not None and self.layer_index == subset.first_layer:
            if any(_is_attention_mask(value) for value in (*args, *kwargs.values())):
                raise ValueError(
                    "proxy_pass_tokens cannot drop tokens in a backbone whose blocks take a token-by-token "
                    "attention mask; leave proxy_pass_tokens at None for this backbone."
                )
            hidden_states = subset.keep(hidden_states)
        trunk = self._router.trunk
        if trunk is None or self.layer_index >= trunk.layers:
            return self._prompted_forward(hidden_states, *args, **kwargs)
        if trunk.replaying:
            return trunk.output
        output = self._prompted_forward(hidden_states, *args, **kwargs)
        trunk.record(self.layer_index, output)
        return output

    def _prompted_forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        prompts = (
            None if self._disable_adapters else self._router.prompts(self.layer_index, hidden_states.shape[0])
        )
        if prompts is None or prompts.shape[1] == 0:
            return self.base_layer(hidden_states, *args, **kwargs)
        if self._takes_prompts_as_keys(args, kwargs):
            output = self._forward_with_prompt_keys(hidden_states, prompts, *args, **kwargs)
            if output is not None:
                return output
        num_tokens = hidden_states.shape[1]
        extended = torch.cat([hidden_states, prompts.to(hidden_states.dtype)], dim=1)
        args = tuple(_pad_attention_mask(a, prompts.shape[1]) for a in args)
        kwargs = {k: _pad_attention_mask(v, prompts.shape[1]) for k, v in kwargs.items()}
        output = self.base_layer(extended, *args, **kwargs)
        if isinstance(output, tuple):
            return (output[0][:, :num_tokens], *output[1:])
        return output[:, :num_tokens]

    def _takes_prompts_as_keys(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        wrapper = self._prompt_keys
        if wrapper is None or not self._router.prompts_as_keys:
            return False
        if any(_is_attention_mask(value) for value in (*args, *kwargs.values())):
            return False  # a token-by-token mask would need the prompts' rows
        return not (wrapper.dropout_is_active() or wrapper.is_observed())

    def _forward_with_prompt_keys(
        self, hidden_states: torch.Tensor, prompts: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        """The block on the image tokens, the prompts its attention's extra keys; None if the block did not hand
        the prompts on to its attention (then this block uses the full path from now on)."""
        wrapper = self._prompt_keys
        assert wrapper is not None
        if prompts.shape[0] > 1 and prompts.stride(0) == 0:
            prompts = prompts[:1]  # one adapter's prompts for the whole batch: their keys once, not per image
        normed = self.base_layer.get_submodule(wrapper.layout.norm)(prompts.to(hidden_states.dtype))
        calls = wrapper.prompted_calls
        output = self.base_layer(hidden_states, *args, **{PROMPT_TOKENS_KWARG: normed}, **kwargs)
        compiled = getattr(self.base_layer, "_compiled_call_impl", None) is not None  # its count stays put
        if wrapper.prompted_calls > calls or compiled:
            return output
        self.release()
        warnings.warn(
            f"Block {self.layer_index} ({type(self.base_layer).__name__}) did not pass vpdml's prompts on to its "
            "attention; it now runs the prompts as full tokens (same result, more compute).",
            stacklevel=3,
        )
        return None

    def __repr__(self) -> str:
        return f"vpdml.{super().__repr__()}"


def _is_attention_mask(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == value.shape[-2]


def _pad_attention_mask(value: Any, num_prompts: int) -> Any:
    """Extend a 4-D (B, 1, T, T) attention mask so image tokens and prompts attend to each other."""
    if not _is_attention_mask(value):
        return value
    fill = True if value.dtype == torch.bool else 0.0
    return nn.functional.pad(value, (0, num_prompts, 0, num_prompts), value=fill)


@contextmanager
def prompted_blocks(blocks: nn.ModuleList, router: PromptRouter) -> Iterator[None]:
    """Route prompts through ``blocks`` for the duration of a ``with``: each block is wrapped in a
    :class:`PromptedBlock` and put back afterwards, so the module tree and its state-dict keys stay the model's
    own (for models that are not the prompt tuner, e.g. :class:`vpdml.LoRADML` with semantic proxies)."""
    wrapped = [PromptedBlock(block, index, router) for index, block in enumerate(blocks)]
    for index, block in enumerate(wrapped):
        blocks[index] = block
    try:
        yield
    finally:
        for index, block in enumerate(wrapped):
            blocks[index] = block.release()


@contextmanager
def mean_block_inputs(blocks: nn.ModuleList, skip_tokens: int) -> Iterator[list[torch.Tensor]]:
    """Inside the ``with``, record for each block the mean over tokens (the first ``skip_tokens`` left out) of the
    hidden state it receives, ``(B, D)`` per block in block order; every block must run."""
    means: list[torch.Tensor | None] = [None] * len(blocks)

    def record(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        means[index] = hidden[:, skip_tokens:].float().mean(dim=1)

    handles = [
        block.register_forward_pre_hook(lambda _, a, k, i=i: record(i, a, k), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    try:
        yield means  # type: ignore[misc]  # filled by the pass run inside the with
    finally:
        for handle in handles:
            handle.remove()
    if any(mean is None for mean in means):
        raise RuntimeError("Not every block ran: cannot take the mean token each block receives.")
