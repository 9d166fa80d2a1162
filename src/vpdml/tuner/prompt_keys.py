"""Prompts as keys and values only: VPT-deep without computing what is thrown away.

In VPT-deep every block gets fresh prompts and drops the prompt tokens' outputs. Inside a block, a token's output
depends on the other tokens only through attention, so the prompts matter to the image tokens as keys and values
and nothing else. Running the block on the image tokens alone, with the prompts' keys and values added inside
attention, gives the same image-token outputs and skips the prompts' queries, attention rows, output projection
and MLP: with 10 prompts and 50 image tokens (ViT-S at 112 px), most of the work of a sixth of the tokens.

The block's own code still runs (norms, residuals, layer scale, drop path, MLP); only its attention module is
wrapped, and the prompts reach that wrapper as a keyword argument the block hands on to its attention (which is
also how a recomputed block under activation checkpointing sees them again).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpdml.modules.backbones import block_part_paths

#: the keyword a block passes on to its attention module: the prompts after the block's pre-attention norm
PROMPT_TOKENS_KWARG = "vpdml_prompt_tokens"
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_out")


@dataclass(frozen=True)
class AttentionLayout:
    """Where one block keeps its attention parts (paths inside the block)."""

    attention: str  # the module the block calls for attention: it holds the four projections
    norm: str  # the pre-attention norm
    projections: dict[str, str]  # canonical name -> path inside the attention module
    num_heads: int
    scale: float | None


def find_attention_layout(block: nn.Module) -> AttentionLayout | None:
    """The attention layout of ``block``, or None when prompts cannot be added as keys there: a part is missing, or
    the block's ``forward`` takes no ``**kwargs`` to hand the prompts on (transformers 4.x blocks)."""
    if not _takes_var_keywords(block):
        return None
    paths = block_part_paths(block)
    if "norm1" not in paths or any(name not in paths for name in _PROJECTIONS):
        return None
    parents = [paths[name].split(".") for name in _PROJECTIONS]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if not common:
        return None
    attention_path = ".".join(common)
    attention = block.get_submodule(attention_path)
    num_heads = _find_attribute(attention, ("num_attention_heads", "num_heads"), int)
    if num_heads is None or not _takes_var_keywords(attention):
        return None
    return AttentionLayout(
        attention=attention_path,
        norm=paths["norm1"],
        projections={name: paths[name][len(attention_path) + 1 :] for name in _PROJECTIONS},
        num_heads=num_heads,
        scale=_find_attribute(attention, ("scaling", "scale"), float),
    )


class PromptKeysAttention(nn.Module):
    """Wraps a block's attention module. Called without prompts it is the module itself; called with
    ``vpdml_prompt_tokens`` (``(B or 1, n, D)``, already through the block's pre-attention norm) it attends from
    the image tokens to the image tokens and the prompts."""

    def __init__(self, base_layer: nn.Module, layout: AttentionLayout) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.prompted_calls = 0  # lets the prompted block check the block really handed the prompts on

    def dropout_is_active(self) -> bool:
        """Attention dropout would drop entries of attention rows this path does not build: use the full path."""
        if not self.training:
            return False
        return any(rate > 0 for module in self.base_layer.modules() for rate in _dropout_rates(module))

    def is_observed(self) -> bool:
        """Hooks on the attention module (e.g. transformers recording attention maps) expect its own output."""
        base = self.base_layer
        return bool(base._forward_hooks or base._forward_pre_hooks)

    def forward(self, *args: Any, vpdml_prompt_tokens: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if vpdml_prompt_tokens is None:
            return self.base_layer(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        # a counter read in a compiled graph would be a guard that fails at every call: count eager calls only
        if not torch.compiler.is_compiling():
            self.prompted_calls += 1
        batch, tokens, _ = hidden.shape
        query, key, value, output = (
            self.base_layer.get_submodule(self.layout.projections[n]) for n in _PROJECTIONS
        )
        prompts = vpdml_prompt_tokens.to(hidden.dtype)

        def keys_for(projection: nn.Module) -> torch.Tensor:
            return torch.cat([projection(hidden), projection(prompts).expand(batch, -1, -1)], dim=1)

        heads = self.layout.num_heads
        q = query(hidden).view(batch, tokens, heads, -1).transpose(1, 2)
        k = keys_for(key).view(batch, -1, heads, q.shape[-1]).transpose(1, 2)
        v = keys_for(value).view(batch, -1, heads, q.shape[-1]).transpose(1, 2)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.layout.scale)
        return output(attended.transpose(1, 2).reshape(batch, tokens, -1)), None

    def __repr__(self) -> str:
        return f"vpdml.{super().__repr__()}"


def wrap_attention(block: nn.Module) -> PromptKeysAttention | None:
    """Put a :class:`PromptKeysAttention` around ``block``'s attention module (None: this block cannot take it)."""
    layout = find_attention_layout(block)
    if layout is None:
        return None
    parent, name = _parent_and_name(block, layout.attention)
    wrapper = PromptKeysAttention(getattr(parent, name), layout)
    setattr(parent, name, wrapper)
    return wrapper


def unwrap_attention(block: nn.Module, wrapper: PromptKeysAttention) -> None:
    """Put ``block``'s own attention module back."""
    parent, name = _parent_and_name(block, wrapper.layout.attention)
    if getattr(parent, name) is wrapper:
        setattr(parent, name, wrapper.base_layer)


def _dropout_rates(module: nn.Module) -> list[float]:
    """An ``nn.Dropout``'s rate, and the float rates an attention module passes to its attention function."""
    rates = [module.p] if isinstance(module, nn.Dropout) else []
    for name in ("attention_dropout", "dropout", "dropout_prob"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            rates.append(value)
    return rates


def _parent_and_name(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (block.get_submodule(parent_path) if parent_path else block), name


def _takes_var_keywords(module: nn.Module) -> bool:
    parameters = inspect.signature(module.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _find_attribute(module: nn.Module, names: tuple[str, ...], kind: type) -> Any:
    for sub in module.modules():
        for name in names:
            value = getattr(sub, name, None)
            if isinstance(value, kind) and not isinstance(value, bool):
                return value
    return None
