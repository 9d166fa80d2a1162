"""The training-only half of an adapter, built from a :class:`VisualPromptDMLConfig`.

Shared by the prompt tuner and by models that reuse its semantic proxies on another adaptation
(:class:`vpdml.LoRADML` with ``semantic_proxies``).
"""

from __future__ import annotations

from vpdml.modules.backbones import BackboneInfo
from vpdml.proxies.bank import ProxyBank
from vpdml.tuner.config import VisualPromptDMLConfig
from vpdml.tuner.layer import TokenSubset


def proxy_bank_for(
    config: VisualPromptDMLConfig, *, embedding_dim: int, hidden_size: int, num_layers: int
) -> ProxyBank:
    """Learnable proxies and, with semantic proxies, the class prompts (per ``config.class_prompt_counts``),
    proxy head, accumulator and semantic state of ``config.num_classes`` classes."""
    if config.num_classes is None:
        raise ValueError(
            "The proxies need VisualPromptDMLConfig.num_classes (the number of training classes)."
        )
    return ProxyBank(
        num_classes=config.num_classes,
        embedding_dim=embedding_dim,
        hidden_size=hidden_size,
        semantic_proxies=config.semantic_proxies,
        class_prompt_counts=config.class_prompt_counts(num_layers),
        keep_ratio=config.proxy_keep_ratio,
        gru_dropout=config.gru_dropout,
        gru_init=config.gru_init,
        mix_alpha=config.proxy_mix_alpha,
        class_prompt_storage=config.class_prompt_storage,
        class_prompt_rank=config.class_prompt_rank,
        class_prompt_offload=config.class_prompt_offload,
        negatives=config.proxy_negatives,
        offload=config.proxy_offload,
        learnable_init=config.learnable_proxy_init,
        mix=config.proxy_mix,
        semantic_init=config.semantic_proxy_init,
        unseen=config.unseen_semantic_proxies,
        proxy_head_init=config.proxy_head_init,
        proxy_pass_every=config.proxy_pass_every,
    )


def proxy_token_subset(config: VisualPromptDMLConfig, info: BackboneInfo) -> TokenSubset | None:
    """The proxy pass's token subset (``config.proxy_pass_tokens``) from its first computing block on; None keeps
    every token."""
    if config.proxy_pass_tokens is None:
        return None
    first_layer = config.shared_trunk_layers(info.num_layers)
    return TokenSubset(config.proxy_pass_tokens, info.num_prefix_tokens, first_layer)
