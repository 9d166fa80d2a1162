"""Proxies for Proxy Anchor: learnable proxies, class-prompt tables, semantic-proxy accumulators, the loss."""

from vpdml.proxies.accumulators import EMAAccumulator, GRUAccumulator, scatter_mean
from vpdml.proxies.bank import LossProxies, ProxyBank
from vpdml.proxies.class_prompts import ClassPromptTable, build_class_prompt_table
from vpdml.proxies.loss import LossSettings, ProxyAnchorLoss, proxy_anchor_loss, proxy_loss
from vpdml.proxies.negatives import sample_negative_classes

__all__ = [
    "ClassPromptTable",
    "EMAAccumulator",
    "GRUAccumulator",
    "LossProxies",
    "LossSettings",
    "ProxyAnchorLoss",
    "ProxyBank",
    "build_class_prompt_table",
    "proxy_anchor_loss",
    "proxy_loss",
    "sample_negative_classes",
    "scatter_mean",
]
