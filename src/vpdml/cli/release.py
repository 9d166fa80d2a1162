"""``vpdml push`` (a finished run to the Hub) and ``vpdml export`` (one ONNX graph, served without PEFT)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="The --output-dir of a finished `vpdml train` run."
    )
    parser.add_argument(
        "--repo", required=True, help="Hub repository to upload to (owner/name; created if needed)."
    )
    parser.add_argument(
        "--hub-token",
        help="Hub token (default: HF_TOKEN, else the saved `hf auth login`). Never written or printed.",
    )
    parser.add_argument(
        "--private",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Create the repository as private (ignored when it exists; default: --no-private).",
    )
    parser.add_argument(
        "--revision", help="Branch to upload to (created from the default branch if missing)."
    )
    return parser


def run_push(namespace: argparse.Namespace) -> str:
    """Upload the run's release files and print the repository URL."""
    from vpdml.training.outputs import push_run_folder

    url = push_run_folder(
        namespace.run_dir,
        namespace.repo,
        token=namespace.hub_token,
        private=namespace.private,
        revision=namespace.revision,
    )
    print(f"Uploaded {namespace.run_dir} to {url}")
    return url


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------

ONNX_INSTALL_HINT = 'vpdml export needs onnx and onnxruntime: pip install "vpdml[onnx]".'


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="A `vpdml train` output folder (adapter, LoRA or full fine-tuning), an adapter folder or a Hub repo id.",
    )
    parser.add_argument(
        "--onnx",
        required=True,
        help="ONNX file to write; the preprocessing goes next to it (out.onnx -> out.json).",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="The graph's fixed input size S (default: the size the run was trained at, from its metrics.json).",
    )
    parser.add_argument("--backbone", help="Backbone to load the adapter onto (default: its base model).")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17).")
    return parser


def run_export(namespace: argparse.Namespace) -> Any:
    """Write the ONNX graph and its preprocessing file, checked against PyTorch; print what was written."""
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):
        raise ValueError(ONNX_INSTALL_HINT)
    from vpdml.retrieval.export import export_run

    result = export_run(
        namespace.run_dir,
        Path(namespace.onnx),
        image_size=namespace.image_size,
        backbone=namespace.backbone,
        opset=namespace.opset,
    )
    print(
        f"Wrote {result.onnx_path} (pixel_values B x 3 x {result.image_size} x {result.image_size} -> embeddings B x "
        f"{result.embedding_dim}; max |ONNX - PyTorch| = {result.max_abs_diff:.2e}) and {result.preprocessing_path}"
    )
    return result
