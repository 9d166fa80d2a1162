"""Reading a DINOv2 ViT-S/14 encoder's weights out of an ONNX graph, and running the graph as a reference.

The export inlined some linear layers as MatMul + Add and baked the position embeddings into the graph: the
helpers here recover every tensor under its transformers name, and check that none is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

HIDDEN_SIZE = 384
NUM_LAYERS = 12
NUM_HEADS = 6
INTERMEDIATE_SIZE = 4 * HIDDEN_SIZE
PATCH_SIZE = 14
NATIVE_IMAGE_SIZE = 518
LAYER_NORM_EPS = 1e-6

ONNX_ENCODER_PREFIX = "backbone."
ONNX_FINAL_LAYERNORM_SCOPE = "/backbone/layernorm/"
ONNX_EMBEDDINGS_SCOPE = "/backbone/embeddings/"


class OfflineBackboneError(RuntimeError):
    """The offline backbone cannot be built (wheel missing or not the pinned version, or bad conversion)."""


# --------------------------------------------------------------------------------------------------
# Reading the encoder out of the ONNX graph
# --------------------------------------------------------------------------------------------------


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise OfflineBackboneError(
            "Converting the offline backbone needs the 'onnx' package: pip install 'vpdml[offline]'"
        ) from error
    return onnx


def load_onnx_model(onnx_path: Path) -> onnx.ModelProto:
    """Load the ONNX graph with its weights."""
    return _require_onnx().load(str(onnx_path))


def read_dinov2_state_dict(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Recover the encoder's weights, keyed like a (legacy-named) transformers ``Dinov2Model`` checkpoint.

    ``mask_token`` is not in the graph (it is only used for masked-image training) and is left out.
    """
    from onnx import numpy_helper

    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    state: dict[str, np.ndarray] = {
        name.removeprefix(ONNX_ENCODER_PREFIX): array
        for name, array in initializers.items()
        if name.startswith(ONNX_ENCODER_PREFIX)
    }
    state.update(_recover_linear_weights(model, initializers))
    state["embeddings.position_embeddings"] = _recover_position_embeddings(model, initializers)
    _check_dinov2_keys(state)
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in state.items()}


def _recover_linear_weights(
    model: onnx.ModelProto, initializers: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Name each anonymous ``MatMul`` weight after the bias added to its output, as (out, in) for torch.

    The exporter keeps the names of biases (consumed by ``Add``) but gives the pre-transposed weights of
    ``x @ W`` generated names, so the bias is the only reliable link back to the module.
    """
    consumers_by_input: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for tensor_name in node.input:
            consumers_by_input.setdefault(tensor_name, []).append(node)

    weights: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        bias_name = _bias_added_to(node.output[0], consumers_by_input, initializers)
        if bias_name is None or not bias_name.startswith(ONNX_ENCODER_PREFIX):
            continue  # the saliency decoder, or a MatMul without a bias: not part of the encoder
        weight_name = bias_name.removeprefix(ONNX_ENCODER_PREFIX).removesuffix(".bias") + ".weight"
        if weight_name in weights:
            raise OfflineBackboneError(f"Two MatMul weights map to {weight_name}: the graph layout changed.")
        weights[weight_name] = initializers[node.input[1]].T
    return weights


def _bias_added_to(
    tensor_name: str, consumers_by_input: dict[str, list[Any]], initializers: dict[str, np.ndarray]
) -> str | None:
    """Name of the bias initializer that an ``Add`` node adds to ``tensor_name``, if exactly one exists."""
    add_nodes = [node for node in consumers_by_input.get(tensor_name, []) if node.op_type == "Add"]
    if len(add_nodes) != 1:
        return None
    biases = [name for name in add_nodes[0].input if name != tensor_name and name.endswith(".bias")]
    if len(biases) != 1 or biases[0] not in initializers:
        return None
    return biases[0]


def _recover_position_embeddings(model: onnx.ModelProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate the CLS position row and the patch-grid positions into one (1, 1 + N, D) table.

    The exporter traced DINOv2's interpolation, so the table appears as two anonymous initializers: the
    patch part feeds a ``Reshape`` (to the square grid before ``Resize``) and the CLS part is the first
    input of the ``Concat`` that rebuilds the table.
    """
    embedding_nodes = [node for node in model.graph.node if node.name.startswith(ONNX_EMBEDDINGS_SCOPE)]
    patch_candidates = [
        node.input[0]
        for node in embedding_nodes
        if node.op_type == "Reshape"
        and node.input[0] in initializers
        and initializers[node.input[0]].ndim == 3
    ]
    cls_candidates = [
        node.input[0]
        for node in embedding_nodes
        if node.op_type == "Concat"
        and node.input[0] in initializers
        and not node.input[0].startswith(ONNX_ENCODER_PREFIX)
        and initializers[node.input[0]].shape == (1, 1, HIDDEN_SIZE)
    ]
    if len(patch_candidates) != 1 or len(cls_candidates) != 1:
        raise OfflineBackboneError(
            "Expected one patch and one CLS position initializer, "
            f"found {patch_candidates} and {cls_candidates}."
        )
    patch_positions = initializers[patch_candidates[0]]
    grid_side = NATIVE_IMAGE_SIZE // PATCH_SIZE
    if patch_positions.shape != (1, grid_side * grid_side, HIDDEN_SIZE):
        raise OfflineBackboneError(f"Unexpected patch position shape {patch_positions.shape}.")
    return np.concatenate([initializers[cls_candidates[0]], patch_positions], axis=1)


def _check_dinov2_keys(state: dict[str, np.ndarray]) -> None:
    """Fail loudly (instead of loading random weights later) when a tensor was not recovered."""
    expected = set(_expected_dinov2_keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise OfflineBackboneError(
            "The ONNX encoder does not match DINOv2 ViT-S/14: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )


def _expected_dinov2_keys() -> list[str]:
    keys = [
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    ]
    per_layer = [
        "norm1",
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "norm2",
        "mlp.fc1",
        "mlp.fc2",
    ]
    for layer in range(NUM_LAYERS):
        prefix = f"encoder.layer.{layer}."
        keys += [f"{prefix}{module}.{kind}" for module in per_layer for kind in ("weight", "bias")]
        keys += [f"{prefix}layer_scale1.lambda1", f"{prefix}layer_scale2.lambda1"]
    return keys


def with_zero_mask_token(dinov2_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add DINOv2's ``mask_token`` as zeros (its initial value upstream) so that loading reports no gap.

    It only replaces patches selected by ``bool_masked_pos``, which inference and fine-tuning never pass.
    """
    return {**dinov2_state, "embeddings.mask_token": np.zeros((1, HIDDEN_SIZE), dtype=np.float32)}


# --------------------------------------------------------------------------------------------------
# DINOv2 -> ViT
# --------------------------------------------------------------------------------------------------


def fold_layer_scale_into_vit(dinov2_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map a DINOv2 state dict onto ``ViTModel``'s (legacy) names, folding LayerScale into the linears.

    DINOv2 computes ``h + lambda * Linear(x)``; scaling the linear's output rows and bias by ``lambda``
    gives the same function without the extra parameter, which ``ViTLayer`` does not have.
    """
    vit_state = {
        name: dinov2_state[name]
        for name in (
            "embeddings.cls_token",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight",
            "layernorm.bias",
        )
    }
    renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attention.attention.query": "attention.attention.query",
        "attention.attention.key": "attention.attention.key",
        "attention.attention.value": "attention.attention.value",
        "mlp.fc1": "intermediate.dense",
    }
    for layer in range(count_layers(dinov2_state)):
        source, target = f"encoder.layer.{layer}.", f"encoder.layer.{layer}."
        for dinov2_name, vit_name in renames.items():
            for kind in ("weight", "bias"):
                vit_state[f"{target}{vit_name}.{kind}"] = dinov2_state[f"{source}{dinov2_name}.{kind}"]
        scaled_outputs = {
            "attention.output.dense": ("attention.output.dense", "layer_scale1.lambda1"),
            "mlp.fc2": ("output.dense", "layer_scale2.lambda1"),
        }
        for dinov2_name, (vit_name, scale_name) in scaled_outputs.items():
            scale = dinov2_state[f"{source}{scale_name}"]
            weight = dinov2_state[f"{source}{dinov2_name}.weight"]
            bias = dinov2_state[f"{source}{dinov2_name}.bias"]
            vit_state[f"{target}{vit_name}.weight"] = np.ascontiguousarray(weight * scale[:, None])
            vit_state[f"{target}{vit_name}.bias"] = bias * scale
    return vit_state


def count_layers(state: dict[str, np.ndarray]) -> int:
    """Number of transformer blocks in a legacy-named (``encoder.layer.N.``) state dict."""
    return sum(1 for name in state if name.startswith("encoder.layer.") and name.endswith(".norm1.weight"))


# --------------------------------------------------------------------------------------------------
# onnxruntime reference
# --------------------------------------------------------------------------------------------------


def encoder_output_name(model: onnx.ModelProto) -> str:
    """Name of the tensor that the encoder's final LayerNorm produces (``last_hidden_state``)."""
    outputs = [
        node.output[0] for node in model.graph.node if node.name.startswith(ONNX_FINAL_LAYERNORM_SCOPE)
    ]
    if not outputs:
        raise OfflineBackboneError(f"No node under {ONNX_FINAL_LAYERNORM_SCOPE} in the ONNX graph.")
    return outputs[-1]  # nodes are topologically sorted: the last one is the LayerNorm's final Add


def onnx_encoder_session(model: onnx.ModelProto) -> Any:
    """An onnxruntime session that returns the encoder's ``last_hidden_state`` for any square input size.

    The graph's input is declared 224 x 224 but every shape inside is computed, so the spatial dims are
    made symbolic; the saliency decoder is cut off by making the encoder output the only graph output.
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise OfflineBackboneError(
            "Checking the conversion needs the 'onnxruntime' package: pip install 'vpdml[offline]'"
        ) from error
    _require_onnx()
    import onnx.helper
    import onnx.utils

    encoder_only = type(model)()
    encoder_only.CopyFrom(model)
    graph = encoder_only.graph
    hidden_name = encoder_output_name(model)
    del graph.output[:]
    element_type = model.graph.input[0].type.tensor_type.elem_type
    graph.output.append(onnx.helper.make_tensor_value_info(hidden_name, element_type, None))
    for axis, symbol in ((2, "height"), (3, "width")):
        graph.input[0].type.tensor_type.shape.dim[axis].dim_param = symbol
    kept_nodes = onnx.utils.Extractor(encoder_only).extract_model([graph.input[0].name], [hidden_name])
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the decoder's now-unused initializers would each print a warning
    return onnxruntime.InferenceSession(
        kept_nodes.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_onnx_encoder(session: Any, pixel_values: np.ndarray) -> np.ndarray:
    """Run the encoder-only session on normalised ``(B, 3, H, W)`` float32 pixels."""
    input_name = session.get_inputs()[0].name
    (hidden,) = session.run(None, {input_name: pixel_values.astype(np.float32)})
    return hidden
