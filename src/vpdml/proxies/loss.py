"""Proxy Anchor loss (Kim et al., CVPR 2020) on cosine similarities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from vpdml.proxies.bank import LossProxies


def _log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_{i in mask} exp(logits_i))`` per column, computed stably (logsumexp with a 0 logit)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zeros = masked.new_zeros(1, masked.shape[1])
    return torch.logsumexp(torch.cat([zeros, masked], dim=0), dim=0)


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    scale: float = 32.0,
    margin: float = 0.1,
    positive_average: str = "classes_with_positives",
    proxy_classes: torch.Tensor | None = None,
    negative_weights: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Proxy Anchor loss.

    ``pos = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-scale * (cos(x, p) - margin)))``
    ``neg = 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( scale * (cos(x, p) + margin)))``

    ``P+`` are the proxies with at least one positive in the batch (the published form). With
    ``positive_average="all_classes"`` the positive term is divided by all C proxies instead, as the official
    VPTSP code does.

    Sampled proxies (``VisualPromptDMLConfig.proxy_negatives``, docs/scale.md): ``proxies`` may hold only the rows
    ``proxy_classes`` (sorted class ids, every label among them) of ``num_classes`` classes. ``negative_weights``
    then scales each row's negative term (1 for the batch's classes, ``(C - |batch classes|) / draws`` per draw
    of another class), so that ``neg`` above, still divided by ``num_classes``, is an unbiased estimate of the
    full sum. Without them this is the exact loss over every row of ``proxies``.
    """
    if embeddings.dim() != 2 or proxies.dim() != 2 or embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"proxy_anchor_loss expects embeddings (B, E) and proxies (C, E); got {tuple(embeddings.shape)} and "
            f"{tuple(proxies.shape)}."
        )
    total = proxies.shape[0] if num_classes is None else num_classes
    if labels.numel() and (labels.min() < 0 or labels.max() >= total):
        raise ValueError(
            f"Labels must lie in [0, {total - 1}] (one proxy per training class); got labels in "
            f"[{int(labels.min())}, {int(labels.max())}]. Remap labels to 0..C-1 or raise num_classes."
        )
    if proxy_classes is not None:
        labels = _positions_in(proxy_classes, labels)
    cosine = F.normalize(embeddings.float(), dim=-1) @ F.normalize(proxies.float(), dim=-1).T  # (B, C)
    positive = F.one_hot(labels, proxies.shape[0]).bool()
    pos_terms = _log1p_sum_exp(-scale * (cosine - margin), positive)
    neg_terms = _log1p_sum_exp(scale * (cosine + margin), ~positive)
    if negative_weights is not None:
        neg_terms = neg_terms * negative_weights.to(neg_terms.dtype)
    with_positives = positive.any(dim=0)
    if positive_average == "all_classes":
        pos_denominator = total
    elif positive_average == "classes_with_positives":
        pos_denominator = int(with_positives.sum().clamp(min=1))
    else:
        raise ValueError(
            f"positive_average must be 'classes_with_positives' or 'all_classes', got {positive_average!r}."
        )
    return pos_terms[with_positives].sum() / pos_denominator + neg_terms.sum() / total


def _positions_in(proxy_classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Row of each label in the sorted ``proxy_classes``; every label must be there (its positive proxy)."""
    positions = torch.searchsorted(proxy_classes, labels).clamp(max=proxy_classes.numel() - 1)
    missing = proxy_classes[positions] != labels
    if bool(missing.any()):
        raise ValueError(
            f"proxy_classes must contain every label (each sample needs its positive proxy); missing "
            f"{sorted(set(labels[missing].tolist()))[:10]}."
        )
    return positions


class ProxyAnchorLoss(nn.Module):
    """Module form of :func:`proxy_anchor_loss` (proxies are passed in, not owned)."""

    def __init__(
        self, scale: float = 32.0, margin: float = 0.1, positive_average: str = "classes_with_positives"
    ) -> None:
        super().__init__()
        self.scale = scale
        self.margin = margin
        self.positive_average = positive_average

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        return proxy_anchor_loss(
            embeddings,
            labels,
            proxies,
            scale=self.scale,
            margin=self.margin,
            positive_average=self.positive_average,
        )


@dataclass(frozen=True)
class LossSettings:
    """The Proxy Anchor hyper-parameters of a model (``proxy_anchor_*`` in its config)."""

    scale: float = 32.0
    margin: float = 0.1
    positive_average: str = "classes_with_positives"


def proxy_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, proxies: LossProxies, settings: LossSettings
) -> torch.Tensor:
    """Proxy Anchor of a batch against the proxies a :class:`~vpdml.proxies.ProxyBank` chose for this step
    (every class, or the batch's classes and sampled negatives): the one place a training loss is assembled."""
    return proxy_anchor_loss(
        embeddings,
        labels,
        proxies.proxies,
        scale=settings.scale,
        margin=settings.margin,
        positive_average=settings.positive_average,
        **proxies.loss_kwargs(),
    )
