"""What vpdml needs to know about each supported backbone family (ViT, DeiT, DINOv2, CLIP vision).

The tuner never hard-codes module paths: it finds the transformer blocks structurally, so both the
transformers >= 5.9 layout (``layers.N``) and the older one (``encoder.layer.N``) work, and it names the
backbone's biases canonically (``blocks.3.attn_q``), so BitFit offsets saved with one layout load with the other.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: transformers ``config.model_type`` -> number of tokens before the patch tokens (CLS, distillation, registers).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "vit",
    "deit",
    "dinov2",
    "dinov2_with_registers",
    "clip_vision_model",
)

#: In-block module paths of every supported layout -> canonical names. Unknown paths keep their own name.
_BLOCK_BIAS_ALIASES: dict[str, str] = {
    # ViT / DeiT / DINOv2, transformers < 5.9
    "attention.attention.query": "attn_q",
    "attention.attention.key": "attn_k",
    "attention.attention.value": "attn_v",
    "attention.output.dense": "attn_out",
    "intermediate.dense": "mlp_fc1",
    "output.dense": "mlp_fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.weights_in": "mlp_fc1",
    "mlp.weights_out": "mlp_fc2",
    # ViT / DeiT / DINOv2, transformers >= 5.9
    "attention.q_proj": "attn_q",
    "attention.k_proj": "attn_k",
    "attention.v_proj": "attn_v",
    "attention.o_proj": "attn_out",
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.gate_proj": "mlp_gate",
    "mlp.up_proj": "mlp_fc1",
    "mlp.down_proj": "mlp_fc2",
    # CLIP vision
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
}

_GLOBAL_BIAS_ALIASES: dict[str, str] = {
    "embeddings.patch_embeddings.projection": "patch_embed",
    "embeddings.patch_embedding": "patch_embed",
    "layernorm": "final_norm",
    "post_layernorm": "final_norm",
    "pre_layrnorm": "pre_norm",
}

#: Modules whose output never reaches the embedding, so BitFit leaves them alone.
_UNUSED_MODULE_PREFIXES: tuple[str, ...] = ("pooler",)


class UnsupportedBackboneError(ValueError):
    """The model is not a ViT-family backbone that vpdml knows how to prompt."""


@dataclass
class BackboneInfo:
    """Everything the tuner needs about one concrete backbone instance."""

    model_type: str
    hidden_size: int
    num_layers: int
    patch_size: int
    image_size: int
    num_prefix_tokens: int
    blocks_path: str
    final_norm_path: str | None
    tokens_are_normalized: bool
    accepts_interpolate_pos_encoding: bool

    def signature(self) -> dict[str, Any]:
        """Shape facts an adapter depends on; compared when an adapter is loaded onto a backbone."""
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "patch_size": self.patch_size,
        }


def _unwrap_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedBackboneError(
            f"{type(model).__name__} has no transformers `config`; vpdml adapts transformers vision backbones "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    return config


def describe_backbone(model: nn.Module) -> BackboneInfo:
    """Inspect a transformers vision backbone; raise :class:`UnsupportedBackboneError` with a fix otherwise."""
    config = _unwrap_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBackboneError(
            f"vpdml does not support backbones of type {model_type!r} ({type(model).__name__}). Supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} base models, e.g. ViTModel, DeiTModel, Dinov2Model, "
            "Dinov2WithRegistersModel, CLIPVisionModel."
        )
    _reject_task_heads(model)
    blocks_path = find_blocks_path(model, config.num_hidden_layers)
    final_norm_path = _find_module_path(model, ("layernorm", "post_layernorm"))
    num_prefix = 1 + (1 if model_type == "deit" else 0) + int(getattr(config, "num_register_tokens", 0) or 0)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    image = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return BackboneInfo(
        model_type=model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        patch_size=patch,
        image_size=image,
        num_prefix_tokens=num_prefix,
        blocks_path=blocks_path,
        final_norm_path=final_norm_path,
        # CLIP returns the encoder output before its final norm; the other families normalise all tokens.
        tokens_are_normalized=model_type != "clip_vision_model",
        accepts_interpolate_pos_encoding="interpolate_pos_encoding"
        in inspect.signature(model.forward).parameters,
    )


def _reject_task_heads(model: nn.Module) -> None:
    for attr in ("vit", "deit", "dinov2", "dinov2_with_registers", "vision_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and hasattr(model, "classifier"):
            raise UnsupportedBackboneError(
                f"{type(model).__name__} is a task model; pass its backbone instead, e.g. "
                f"get_peft_model(model.{attr}, config)."
            )


def find_blocks_path(model: nn.Module, num_layers: int) -> str:
    """Path of the ``ModuleList`` of transformer blocks (``layers``, ``encoder.layer``, ``encoder.layers``...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0:
            kinds = {type(block).__name__ for block in module}
            if len(kinds) == 1:
                return name
    raise UnsupportedBackboneError(
        f"Could not find the {num_layers} transformer blocks of {type(model).__name__} (expected a ModuleList "
        "such as `layers` or `encoder.layer`)."
    )


def _find_module_path(model: nn.Module, names: tuple[str, ...]) -> str | None:
    for path, _ in model.named_modules():
        if path.rsplit(".", 1)[-1] in names:
            return path
    return None


def biased_modules(model: nn.Module, info: BackboneInfo) -> dict[str, nn.Module]:
    """Canonical BitFit name -> module, for every module with a bias whose output reaches the embedding."""
    found: dict[str, nn.Module] = {}
    block_prefix = info.blocks_path + "."
    for raw_path, module in model.named_modules():
        if not isinstance(getattr(module, "bias", None), nn.Parameter):
            continue
        path = raw_path.replace(".base_layer", "")  # tolerate blocks already wrapped by the tuner
        stripped = path.removeprefix("vision_model.")
        if stripped.startswith(_UNUSED_MODULE_PREFIXES):
            continue
        if path.startswith(block_prefix):
            index, _, inner = path[len(block_prefix) :].partition(".")
            canonical = f"blocks.{index}.{_BLOCK_BIAS_ALIASES.get(inner, inner.replace('.', '_'))}"
        else:
            canonical = _GLOBAL_BIAS_ALIASES.get(stripped, stripped.replace(".", "_"))
        found[canonical] = module
    return found


def block_part_paths(block: nn.Module) -> dict[str, str]:
    """Canonical part name (``attn_q``, ``norm1``...) -> its path inside one transformer block, for every part the
    supported layouts name, whether or not it has a bias (a tuner layer's ``base_layer`` hop is skipped)."""
    found: dict[str, str] = {}
    for raw_path, _ in block.named_modules():
        canonical = _BLOCK_BIAS_ALIASES.get(raw_path.replace(".base_layer", ""))
        if canonical is not None and canonical not in found:
            found[canonical] = raw_path
    return found


def pooled_features(
    model: nn.Module, info: BackboneInfo, pixel_values: torch.Tensor, pooling: str
) -> torch.Tensor:
    """``(B, D)`` image feature after the backbone's final norm: the CLS token or the mean of the patch tokens."""
    kwargs: dict[str, Any] = {}
    if info.accepts_interpolate_pos_encoding and tuple(pixel_values.shape[-2:]) != (
        info.image_size,
        info.image_size,
    ):
        kwargs["interpolate_pos_encoding"] = True
    outputs = model(pixel_values=pixel_values, **kwargs)
    tokens = outputs.last_hidden_state
    if pooling == "cls":
        return tokens[:, 0] if info.tokens_are_normalized else outputs.pooler_output
    patches = tokens[:, info.num_prefix_tokens :]
    if not info.tokens_are_normalized and info.final_norm_path is not None:
        patches = model.get_submodule(info.final_norm_path)(patches)
    return patches.mean(dim=1)


def compile_blocks(backbone: nn.Module, **compile_kwargs: Any) -> int:
    """Compile each transformer block of ``backbone`` in place with ``torch.compile`` (regional compilation).

    Compiling the blocks rather than the whole model keeps vpdml's prompt routing (Python callables that pick
    the prompts of the current pass) outside the compiled graphs, compiles one block graph that all blocks reuse,
    and leaves parameter names, ``state_dict`` keys and saved adapters unchanged (``nn.Module.compile``). A
    prompted block's inner layer is compiled; the appended prompts change the sequence length between the
    sample pass and the proxy pass, so ``dynamic=True`` is the default. Returns the number of blocks compiled.
    """
    info = describe_backbone(backbone)
    blocks = backbone.get_submodule(info.blocks_path)
    options = {"dynamic": True, **compile_kwargs}
    for block in blocks:
        # a tuner layer (PEFT's convention, vpdml's PromptedBlock included) wraps the block as base_layer
        getattr(block, "base_layer", block).compile(**options)
    return len(blocks)
