"""One ONNX graph per trained model, served without PEFT or vpdml: ``pixel_values`` in, ``embeddings`` out.

The graph is traced by the TorchScript-based exporter (``dynamo=False``): the prompts an adapter appends and the
BitFit offsets its hooks add are chosen by Python-level routing while the model runs, and tracing records the
operations that routing produced for the active adapter. (The dynamo exporter also needs ``onnxscript``.) Every
export is run once with onnxruntime at batch sizes other than the traced one and compared with PyTorch.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpdml.atomic_io import atomic_write_json
from vpdml.data.transforms import WHITE, EvalTransform
from vpdml.models.protocol import as_dml_model
from vpdml.retrieval.pretrained import eval_transform_for, load_trained_model, trained_image_size
from vpdml.version import __version__

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embeddings"
PREPROCESSING_FORMAT = "vpdml-onnx-preprocessing/1"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
#: the batch size traced, and those the check runs (other sizes prove the batch axis is dynamic)
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)


class EmbeddingGraph(nn.Module):
    """``pixel_values -> embeddings`` of a trained model (adapter, LoRA or full fine-tuning): what is exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._dml = as_dml_model(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._dml.embed(pixel_values)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how closely the graph matches PyTorch."""

    onnx_path: Path
    preprocessing_path: Path
    image_size: int
    embedding_dim: int
    max_abs_diff: float


def preprocessing_path_for(onnx_path: str | Path) -> Path:
    """``out.onnx`` -> ``out.json``."""
    return Path(onnx_path).with_suffix(".json")


def preprocessing_of(transform: EvalTransform) -> dict[str, Any]:
    """The evaluation transform as plain settings, for code that preprocesses without vpdml."""
    return {
        "image_size": transform.size,
        "resize_shorter_side": transform.resize_size,
        "resample": "bilinear",
        "crop": "center",
        "color": "RGB",
        "transparent_background": list(WHITE),
        "rescale_factor": 1 / 255,
        "mean": list(transform.mean),
        "std": list(transform.std),
        "layout": "NCHW",
        "dtype": "float32",
    }


def _sample(batch: int, image_size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def onnx_max_abs_diff(
    onnx_path: str | Path, model: nn.Module, image_size: int, batch_sizes: Sequence[int] = CHECK_BATCHES
) -> tuple[float, int]:
    """``(max |ONNX - PyTorch|, embedding size)`` over random batches of ``batch_sizes`` images, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    worst, dim = 0.0, 0
    for seed, batch in enumerate(batch_sizes):
        pixel_values = _sample(batch, image_size, seed)
        with torch.no_grad():
            reference = as_dml_model(model).embed(pixel_values.to(device)).float().cpu().numpy()
        (embeddings,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy()})
        if embeddings.shape != reference.shape:
            raise ValueError(
                f"The ONNX graph returned {embeddings.shape} for {batch} images, PyTorch {reference.shape}."
            )
        worst, dim = max(worst, float(np.abs(embeddings - reference).max())), reference.shape[1]
    return worst, dim


def _trace_to_onnx(model: nn.Module, path: Path, image_size: int, opset: int) -> None:
    """Trace ``model``'s embedding into ``path``, with the embedding size declared on the output."""
    import onnx

    device = next(model.parameters()).device
    sample = _sample(TRACE_BATCH, image_size, seed=TRACE_BATCH).to(device)
    with warnings.catch_warnings(), torch.no_grad():
        # shape checks in the model's Python code are constant for a fixed image size; the legacy exporter is chosen
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        embedding_dim = as_dml_model(model).embed(sample).shape[1]
        torch.onnx.export(
            EmbeddingGraph(model),
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = embedding_dim  # traced as a symbol
    onnx.save(graph, str(path))


def export_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    transform: EvalTransform,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    info: Mapping[str, Any] | None = None,
) -> OnnxExport:
    """Write ``model``'s embedding as one ONNX graph at ``transform.size`` and the preprocessing next to it.

    The file is only put in place once onnxruntime matches PyTorch to ``tolerance`` (max abs difference).
    ``info`` (source, backbone, method...) is recorded in the preprocessing file.

    Raises:
        ValueError: the path does not end in ``.onnx``, or the graph differs from PyTorch by more than ``tolerance``.
    """
    onnx_path = Path(onnx_path)
    if onnx_path.suffix != ".onnx":
        raise ValueError(f"The ONNX file name must end in .onnx, got {onnx_path.name!r}.")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    image_size = int(transform.size)
    handle, tmp_name = tempfile.mkstemp(dir=onnx_path.parent, suffix=".onnx.tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    was_training = model.training
    model.eval()
    try:
        _trace_to_onnx(model, tmp, image_size, opset)
        max_abs_diff, embedding_dim = onnx_max_abs_diff(tmp, model, image_size)
        if not max_abs_diff <= tolerance:
            raise ValueError(
                f"The ONNX graph differs from PyTorch by up to {max_abs_diff:.3g} (tolerance {tolerance:g}); "
                f"{onnx_path} was not written."
            )
        os.replace(tmp, onnx_path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    preprocessing = {
        "format": PREPROCESSING_FORMAT,
        "onnx": onnx_path.name,
        "input": INPUT_NAME,
        "input_shape": ["batch", 3, image_size, image_size],
        "output": OUTPUT_NAME,
        "embedding_dim": embedding_dim,
        "l2_normalized": True,
        **preprocessing_of(transform),
        "opset": opset,
        "max_abs_diff": max_abs_diff,
        "vpdml_version": __version__,
        **dict(info or {}),
    }
    preprocessing_path = preprocessing_path_for(onnx_path)
    atomic_write_json(preprocessing_path, preprocessing)
    return OnnxExport(onnx_path, preprocessing_path, image_size, embedding_dim, max_abs_diff)


def export_run(
    run: str | Path,
    onnx_path: str | Path,
    *,
    image_size: int | None = None,
    backbone: str | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
) -> OnnxExport:
    """:func:`export_onnx` of a trained run (folder or Hub repo), at ``image_size`` or the size it was trained at."""
    model, backbone_name = load_trained_model(str(run), backbone)
    size = image_size or trained_image_size(str(run))
    transform = eval_transform_for(model, backbone_name, size)
    info = {"source": str(run), "backbone": backbone_name, "method": as_dml_model(model).describe()}
    return export_onnx(model, onnx_path, transform, opset=opset, tolerance=tolerance, info=info)
