"""`VisualPromptDMLConfig`: every knob of VPTSP in one PEFT config dataclass."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft.config import PeftConfig

from vpdml.modules.prompts import prompt_schedule
from vpdml.proxies.loss import LossSettings
from vpdml.tuner.peft_type import VPDML_PEFT_TYPE

SemanticProxyKind = Literal["none", "ema", "gru"]
PoolingKind = Literal["cls", "mean"]
PositiveAverage = Literal["classes_with_positives", "all_classes"]
ClassPromptStorage = Literal["auto", "dense", "sparse", "low_rank"]
LearnableProxyInit = Literal["kaiming", "small"]
ProxyMix = Literal["raw", "normalized"]
SemanticProxyInit = Literal["random", "first_pass", "class_means"]
UnseenSemanticProxies = Literal["semantic", "learnable"]
ProxyHeadInit = Literal["random", "embedding_head"]
PromptInit = Literal["xavier", "token_mean"]
GRUInit = Literal["pytorch", "xavier"]

#: Fields an ``adapter_config.json`` must hold: they fix the shapes of the saved weights (or, for ``pooling``, what
#: the embedding reads), so a default in their place would fail later with a bare size mismatch or embed wrongly.
REQUIRED_SAVED_FIELDS = ("num_prompts", "prompt_depth", "prompt_step", "embedding_dim", "pooling", "bitfit")

#: The baselines of the paper, as overrides of the config defaults. ``full-finetune`` is not a PEFT adapter:
#: see :class:`vpdml.FullFineTuningDML`.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "linear": {"num_prompts": 0, "bitfit": False, "semantic_proxies": "none"},
    # prompt methods start their prompts at the mean token each block already receives, so the prompted backbone
    # starts where the frozen one is instead of wherever a random draw puts it (docs/method.md)
    "vpt": {"bitfit": False, "semantic_proxies": "none", "prompt_init": "token_mean"},
    "vpt-bitfit": {"bitfit": True, "semantic_proxies": "none", "prompt_init": "token_mean"},
    # the proxy pass re-encodes one image per class, through every block as in the paper, with a random quarter of
    # its patch tokens: about 1.2x a VPT + BitFit step instead of 1.7-2x, as accurate as the whole pass
    # (docs/method.md, docs/benchmarks.md)
    "vptsp-m": {
        "bitfit": True,
        "semantic_proxies": "ema",
        "proxy_pass_tokens": 0.25,
        "semantic_images_per_class": 1,
        "prompt_init": "token_mean",
    },
    "vptsp-g": {
        "bitfit": True,
        "semantic_proxies": "gru",
        "proxy_pass_tokens": 0.25,
        "semantic_images_per_class": 1,
        "prompt_init": "token_mean",
    },
}


@dataclass
class VisualPromptDMLConfig(PeftConfig):
    """Configuration of a visual-prompt deep-metric-learning adapter (VPTSP, Ren et al., ICLR 2024).

    The trained parts are: shared VPT-deep prompts in the backbone's layers, an embedding head, optionally the
    backbone's biases (BitFit), and, for training only, class prompts that turn the frozen backbone into a
    generator of semantic proxies for a Proxy-Anchor loss. Use :meth:`for_method` for the paper's baselines.

    Invalid values raise ``ValueError`` at construction, naming the field and its allowed range.
    """

    # --- shared visual prompts (kept at inference) -------------------------------------------------------------
    num_prompts: int = field(
        default=10,
        metadata={
            "help": "Prompt tokens N inserted in the first layer (0 = no prompts, i.e. a linear probe)."
        },
    )
    prompt_depth: int | None = field(
        default=None,
        metadata={"help": "Number of leading layers that get prompts (None = every layer of the backbone)."},
    )
    prompt_step: int = field(
        default=0,
        metadata={"help": "Decreasing prompts: layer i gets max(N - step * i, 0) prompts (0 = constant)."},
    )
    prompt_init: PromptInit = field(
        default="xavier",
        metadata={
            "help": "Start of the shared prompts: VPT's 'xavier' normal draw, or 'token_mean': each layer's prompts "
            "centred on the mean patch token the frozen backbone feeds that block over a sample of training images "
            "(set by the trainer before the head warm-up; docs/method.md)."
        },
    )
    bitfit: bool = field(
        default=False,
        metadata={
            "help": "Train an offset on every backbone bias (BitFit); the backbone itself is not modified."
        },
    )
    pooling: PoolingKind = field(
        default="cls",
        metadata={"help": "Image feature fed to the head: 'cls' token or 'mean' of the patch tokens."},
    )
    embedding_dim: int | None = field(
        default=None,
        metadata={
            "help": "Output embedding size E (None = the backbone's hidden size; paper: 384 ViT-S, 512 ViT-B)."
        },
    )
    # --- proxies and semantic proxies (training only) ---------------------------------------------------------
    num_classes: int | None = field(
        default=None,
        metadata={
            "help": "Number of training classes (labels 0..C-1). Needed for the loss; None = embed only."
        },
    )
    semantic_proxies: SemanticProxyKind = field(
        default="gru",
        metadata={
            "help": "How proxies are built from class prompts: 'none' (plain learnable proxies), 'ema', 'gru'."
        },
    )
    class_prompts: int = field(
        default=3, metadata={"help": "Class prompt tokens m per class in the first layer of the proxy pass."}
    )
    class_prompt_depth: int | None = field(
        default=None,
        metadata={
            "help": "Number of leading layers of the proxy pass that get class prompts (None = every one)."
        },
    )
    class_prompt_step: int = field(
        default=0, metadata={"help": "Decreasing class prompts: layer i gets max(m - step * i, 0)."}
    )
    class_prompt_init: PromptInit = field(
        default="xavier",
        metadata={
            "help": "Start of the class prompts: 'xavier' normal draw, or 'token_mean': like prompt_init, every class's "
            "prompts centred on the frozen backbone's mean block tokens (not with class_prompt_storage='low_rank')."
        },
    )
    class_prompt_storage: ClassPromptStorage = field(
        default="auto",
        metadata={
            "help": "Storage of the (C x layers x m x D) class-prompt table: 'dense', 'sparse' (row-sparse gradient), 'low_rank', or 'auto' (dense up to 2**25 elements). docs/scale.md."
        },
    )
    class_prompt_rank: int = field(
        default=64,
        metadata={
            "help": "Rank r of the 'low_rank' class-prompt table (C x r codes, r x layers x m x D basis)."
        },
    )
    class_prompt_offload: bool = field(
        default=False,
        metadata={
            "help": "Keep the row-sparse class-prompt table and its optimizer state in host memory (single process). docs/scale.md."
        },
    )
    semantic_images_per_class: int | None = field(
        default=None,
        metadata={
            "help": "Images per class re-encoded in the proxy pass (None = every batch image, as in the paper)."
        },
    )
    proxy_pass_every: int = field(
        default=1,
        metadata={
            "help": "Run the proxy pass on every k-th training step only (1 = every step, as in the paper)."
        },
    )
    proxy_pass_layers: int | None = field(
        default=None,
        metadata={
            "help": "Run the proxy pass through the last N blocks only, continuing the sample pass's hidden states (None, or N >= the depth = a whole pass, as in the paper)."
        },
    )
    proxy_pass_tokens: float | None = field(
        default=None,
        metadata={
            "help": "Share of each image's patch tokens kept in the proxy pass, a fresh random subset per image and "
            "step, in (0, 1] (None = every token, as in the paper). The sample pass always sees every token."
        },
    )
    fuse_proxy_pass: bool = field(
        default=True,
        metadata={
            "help": "Run the sample and proxy passes as one backbone pass when their prompt counts match."
        },
    )
    proxy_keep_ratio: float = field(
        default=0.8,
        metadata={
            "help": "EMA keep ratio lambda in P <- normalise(lambda * P + (1 - lambda) * mean(s)); in [0, 1)."
        },
    )
    gru_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the GRU's new proxy state during training, in [0, 1)."}
    )
    gru_init: GRUInit = field(
        default="pytorch",
        metadata={
            "help": "GRU weights: PyTorch's nn.Linear default, or 'xavier' (each of the six D x D matrices "
            "xavier-uniform, zero biases: the official code)."
        },
    )
    proxy_mix_alpha: float = field(
        default=0.5,
        metadata={
            "help": "alpha in Q = normalise((1 - alpha) * P + alpha * O): weight of the learnable proxies O."
        },
    )
    learnable_proxy_init: LearnableProxyInit = field(
        default="kaiming",
        metadata={
            "help": "Learnable proxies O: 'kaiming' (Proxy Anchor) or 'small' (official VPTSP, xavier / 8)."
        },
    )
    proxy_mix: ProxyMix = field(
        default="raw",
        metadata={
            "help": "Mix P with O as it is ('raw') or with normalise(O) ('normalized', alpha a real weight)."
        },
    )
    semantic_proxy_init: SemanticProxyInit = field(
        default="random",
        metadata={
            "help": "Start of each class's semantic state P_c: 'random' unit vectors, its 'first_pass' semantic "
            "vectors, or 'class_means' of the proxy head over cached training features (before training)."
        },
    )
    unseen_semantic_proxies: UnseenSemanticProxies = field(
        default="learnable",
        metadata={
            "help": "Proxy of a class whose P_c is still random: the mix ('semantic') or O alone ('learnable')."
        },
    )
    proxy_head_init: ProxyHeadInit = field(
        default="random",
        metadata={
            "help": "Proxy head: 'random', or a copy of the warmed-up embedding head ('embedding_head')."
        },
    )
    # --- loss -------------------------------------------------------------------------------------------------
    proxy_anchor_scale: float = field(
        default=32.0, metadata={"help": "Proxy Anchor scale (alpha in Kim et al.)."}
    )
    proxy_anchor_margin: float = field(
        default=0.1, metadata={"help": "Proxy Anchor margin (delta), in [0, 1)."}
    )
    proxy_anchor_positive_average: PositiveAverage = field(
        default="classes_with_positives",
        metadata={
            "help": "Divide Proxy Anchor's positive term by the proxies with a positive in the batch (published) or by 'all_classes' (official VPTSP code)."
        },
    )
    proxy_negatives: int | None = field(
        default=None,
        metadata={
            "help": "Score each batch against its classes plus this many sampled others (unbiased estimate; None = every class). docs/scale.md."
        },
    )
    proxy_offload: bool = field(
        default=False,
        metadata={
            "help": "With proxy_negatives: keep the proxies and their state in host memory (single process). docs/scale.md."
        },
    )
    # --- backbone signature (filled on injection, checked on load) ---------------------------------------------
    backbone_signature: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Shape of the backbone the adapter was built for; filled automatically, checked on load."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = VPDML_PEFT_TYPE
        self._validate()

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> VisualPromptDMLConfig:
        """Config of one of the paper's PEFT baselines: ``linear``, ``vpt``, ``vpt-bitfit``, ``vptsp-m``,
        ``vptsp-g``; keyword arguments override any field."""
        key = method.lower()
        if key not in METHOD_PRESETS:
            hint = (
                " (full fine-tuning is not an adapter: use vpdml.FullFineTuningDML)" if "full" in key else ""
            )
            raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHOD_PRESETS)}{hint}.")
        return cls(**{**METHOD_PRESETS[key], **overrides})

    @property
    def uses_semantic_proxies(self) -> bool:
        return self.semantic_proxies != "none"

    def shared_trunk_layers(self, num_layers: int) -> int:
        """Leading blocks the proxy pass shares with the sample pass (0: a whole proxy pass)."""
        return max(num_layers - (self.proxy_pass_layers or num_layers), 0)

    def class_prompt_counts(self, num_layers: int) -> list[int]:
        """Class prompts per backbone layer: the ``class_prompts`` / ``class_prompt_step`` / ``class_prompt_depth``
        schedule over the blocks the proxy pass runs (the last ``proxy_pass_layers``), 0 in the shared trunk."""
        # N >= the backbone's depth is the whole pass: the presets' N = 2 then still fits a 1-block backbone
        proxy_layers = num_layers - self.shared_trunk_layers(num_layers)
        schedule = prompt_schedule(
            self.class_prompts, self.class_prompt_step, self.class_prompt_depth, proxy_layers
        )
        return [0] * (num_layers - proxy_layers) + schedule

    @property
    def loss_settings(self) -> LossSettings:
        return LossSettings(
            self.proxy_anchor_scale, self.proxy_anchor_margin, self.proxy_anchor_positive_average
        )

    def _validate(self) -> None:
        _check_int(self, "num_prompts", minimum=0)
        _check_optional_int(self, "prompt_depth", minimum=1)
        _check_int(self, "prompt_step", minimum=0)
        _check_choice(self, "pooling", ("cls", "mean"))
        _check_optional_int(self, "embedding_dim", minimum=1)
        _check_optional_int(self, "num_classes", minimum=1)
        _check_choice(self, "semantic_proxies", ("none", "ema", "gru"))
        _check_int(self, "class_prompts", minimum=1 if self.uses_semantic_proxies else 0)
        _check_optional_int(self, "class_prompt_depth", minimum=1)
        _check_int(self, "class_prompt_step", minimum=0)
        _check_choice(self, "class_prompt_storage", ("auto", "dense", "sparse", "low_rank"))
        _check_int(self, "class_prompt_rank", minimum=1)
        _check_choice(self, "class_prompt_init", ("xavier", "token_mean"))
        if self.class_prompt_init == "token_mean" and self.class_prompt_storage == "low_rank":
            raise ValueError(
                "VisualPromptDMLConfig.class_prompt_init='token_mean' needs a dense or sparse class-prompt table: a "
                "low-rank table (code @ basis) cannot hold every class's prompts at one mean token. Set "
                "class_prompt_storage to 'auto', 'dense' or 'sparse', or class_prompt_init='xavier'."
            )
        if not isinstance(self.class_prompt_offload, bool):
            raise _field_error(self, "class_prompt_offload", "True or False")
        if self.class_prompt_offload and self.class_prompt_storage == "dense":
            raise ValueError(
                "VisualPromptDMLConfig.class_prompt_offload=True needs a row-sparse class-prompt table: set "
                "class_prompt_storage to 'sparse', 'low_rank' or 'auto' (a dense table's gradient and optimizer step "
                "cover every row, so it cannot stay in host memory)."
            )
        _check_optional_int(self, "semantic_images_per_class", minimum=1)
        _check_int(self, "proxy_pass_every", minimum=1)
        _check_optional_int(self, "proxy_pass_layers", minimum=1)
        if self.proxy_pass_tokens is not None:
            _check_range(self, "proxy_pass_tokens", 0.0, 1.0, include_low=False)
        if not isinstance(self.fuse_proxy_pass, bool):
            raise _field_error(self, "fuse_proxy_pass", "True or False")
        _check_range(self, "proxy_keep_ratio", 0.0, 1.0, include_high=False)
        _check_range(self, "gru_dropout", 0.0, 1.0, include_high=False)
        _check_range(self, "proxy_mix_alpha", 0.0, 1.0, include_high=True)
        _check_choice(self, "learnable_proxy_init", ("kaiming", "small"))
        _check_choice(self, "proxy_mix", ("raw", "normalized"))
        _check_choice(self, "semantic_proxy_init", ("random", "first_pass", "class_means"))
        _check_choice(self, "unseen_semantic_proxies", ("semantic", "learnable"))
        _check_choice(self, "proxy_head_init", ("random", "embedding_head"))
        _check_choice(self, "gru_init", ("pytorch", "xavier"))
        _check_choice(self, "prompt_init", ("xavier", "token_mean"))
        _check_range(self, "proxy_anchor_scale", 0.0, math.inf, include_low=False)
        _check_range(self, "proxy_anchor_margin", 0.0, 1.0, include_high=False)
        _check_choice(self, "proxy_anchor_positive_average", ("classes_with_positives", "all_classes"))
        _check_optional_int(self, "proxy_negatives", minimum=1)
        if not isinstance(self.proxy_offload, bool):
            raise _field_error(self, "proxy_offload", "True or False")
        if self.proxy_offload and self.proxy_negatives is None:
            raise ValueError(
                "VisualPromptDMLConfig.proxy_offload=True needs proxy_negatives: the exact loss reads every proxy and "
                "updates every row each step, so the proxies cannot stay in host memory. Set proxy_negatives=N."
            )
        if not isinstance(self.bitfit, bool):
            raise ValueError(f"VisualPromptDMLConfig.bitfit must be True or False, got {self.bitfit!r}.")
        if self.uses_semantic_proxies and self.num_classes is None:
            raise ValueError(
                f"VisualPromptDMLConfig.num_classes is required when semantic_proxies={self.semantic_proxies!r}: "
                "class prompts and proxies need one row per training class. Pass num_classes=<number of training "
                "classes>, or semantic_proxies='none' for an adapter that only embeds."
            )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Check the fields read from an ``adapter_config.json`` (PEFT calls this in ``from_pretrained``).

        A missing weight-shape field (:data:`REQUIRED_SAVED_FIELDS`) raises, naming it; unknown fields (a typo, or
        a file from a newer vpdml) are dropped with a warning that names them.
        """
        kwargs = super().check_kwargs(**kwargs)
        if kwargs.get("peft_type", VPDML_PEFT_TYPE) != VPDML_PEFT_TYPE:
            return kwargs
        missing = [name for name in REQUIRED_SAVED_FIELDS if name not in kwargs]
        if missing:
            raise ValueError(
                f"adapter_config.json lacks the field(s) {missing}, which fix the adapter's weight shapes: the file "
                "is incomplete or was edited. Restore it from the run that saved adapter_model.safetensors."
            )
        unknown = sorted(set(kwargs) - cls.field_names())
        if unknown:
            warnings.warn(
                f"adapter_config.json has field(s) {unknown} that VisualPromptDMLConfig does not know; they are "
                "ignored. Check for a typo, or upgrade vpdml if a newer version saved the adapter.",
                UserWarning,
                stacklevel=2,
            )
            kwargs = {key: value for key, value in kwargs.items() if key not in unknown}
        return kwargs


def _field_error(config: VisualPromptDMLConfig, name: str, allowed: str) -> ValueError:
    value = getattr(config, name)
    return ValueError(f"VisualPromptDMLConfig.{name} must be {allowed}, got {value!r}.")


def _check_int(config: VisualPromptDMLConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _field_error(config, name, f"an integer >= {minimum}")


def _check_optional_int(config: VisualPromptDMLConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise _field_error(config, name, f"None or an integer >= {minimum}")


def _check_choice(config: VisualPromptDMLConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise _field_error(config, name, "one of " + ", ".join(repr(c) for c in choices))


def _check_range(
    config: VisualPromptDMLConfig,
    name: str,
    low: float,
    high: float,
    *,
    include_low: bool = True,
    include_high: bool = True,
) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if include_low else value > low) and (
            value <= high if include_high else value < high
        )
    if not ok:
        left = "[" if include_low else "("
        right = "]" if include_high else ")"
        shown_high = "inf" if math.isinf(high) else f"{high:g}"
        raise _field_error(config, name, f"a number in {left}{low:g}, {shown_high}{right}")
