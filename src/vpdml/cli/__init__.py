"""The ``vpdml`` command line: ``train``, ``evaluate``, ``embed``, ``index build``, ``search``, ``app``, ``push``,
``export`` and ``demo``.

Examples::

    vpdml train --dataset cub200 --recipe cub200 --backbone google/vit-base-patch16-224-in21k --output-dir runs/cub
    accelerate launch -m vpdml.cli train --dataset sop --data-dir ./Stanford_Online_Products --recipe sop ...
    vpdml evaluate --adapter runs/cub --dataset cub200
    vpdml embed --adapter runs/cub --images ./photos --out photos.safetensors
    vpdml index build --adapter runs/cub --images ./photos --out photos.index
    vpdml search --index photos.index query.jpg -k 10
    vpdml app --index photos=photos.index            # a Gradio demo app (pip install "vpdml[app]")
    vpdml push runs/cub --repo me/vit-b16-cub-vptsp  # a finished run to the Hub
    vpdml export runs/cub --onnx cub.onnx            # one ONNX graph + cub.json (preprocessing)
    vpdml demo

Every :class:`vpdml.training.TrainingArguments` field and the adapter options of
:class:`vpdml.VisualPromptDMLConfig` are flags (``--learning-rate``, ``--num-prompts``...). Values come from, in
order of precedence: the command line, the ``--recipe``, the library defaults. :func:`add_train_arguments` builds
the ``train`` flags on any parser (``examples/train_dml.py`` uses it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from vpdml.cli.release import add_export_arguments, add_push_arguments, run_export, run_push
from vpdml.cli.retrieval import (
    add_app_arguments,
    add_embed_arguments,
    add_index_arguments,
    add_search_arguments,
    parse_index_specs,
    run_app,
    run_embed,
    run_index,
    run_search,
)
from vpdml.cli.training import (
    ADAPTER_OPTIONS,
    add_evaluate_arguments,
    add_train_arguments,
    run_evaluate,
    run_train,
    training_settings,
)

__all__ = [
    "ADAPTER_OPTIONS",
    "add_train_arguments",
    "build_parser",
    "main",
    "parse_index_specs",
    "run_train",
    "training_settings",
]

# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``vpdml`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="vpdml",
        description="Parameter-efficient deep metric learning (VPTSP: visual prompts + semantic proxies) as a PEFT "
        "adapter. Train an adapter on a retrieval benchmark, score it, or embed images with it.",
        epilog="Multi-GPU: `accelerate launch -m vpdml.cli train ...`. Run `vpdml <command> --help` for the flags.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_arguments(
        commands.add_parser(
            "train",
            help="train an adapter (or full fine-tuning) and evaluate it",
            description="Train on the training classes, pick the best checkpoint on --validation-classes (if any), "
            "evaluate zero-shot backbone vs trained on the held-out classes, and save the adapter, metrics.json, a "
            "model card and plots to --output-dir (optionally --push-to-hub).",
        )
    )
    add_evaluate_arguments(
        commands.add_parser(
            "evaluate",
            help="score an adapter: Recall@K, MAP@R, R-Precision",
            description="Embed a benchmark split with an adapter and print Recall@K, MAP@R and R-Precision.",
        )
    )
    add_embed_arguments(
        commands.add_parser(
            "embed",
            help="embed images with an adapter into a .safetensors/.npz file",
            description="Write L2-normalised embeddings of a folder of images (or a Hub dataset) to a file.",
        )
    )
    add_index_arguments(
        commands.add_parser(
            "index",
            help="build a gallery index of images for `vpdml search`",
            description="Gallery indexes: `vpdml index build --adapter A --images DIR --out INDEX`.",
        )
    )
    add_search_arguments(
        commands.add_parser(
            "search",
            help="find the images of an index most similar to query images",
            description="Embed query images with the index's adapter and print the -k most similar gallery images "
            "(rank, cosine score, path). A query embedded with another adapter is refused.",
        )
    )
    add_app_arguments(
        commands.add_parser(
            "app",
            help="a web app (Gradio) to search gallery indexes with query images",
            description="Serve a Gradio app: choose an adapter (one gallery index each), upload or pick a query "
            "image, see the top-k gallery images with their scores. Needs `pip install vpdml[app]`. See "
            "docs/retrieval.md.",
        )
    )
    add_push_arguments(
        commands.add_parser(
            "push",
            help="upload a finished run (adapter, card, metrics, plots) to the Hugging Face Hub",
            description="Upload a finished adapter run to a Hub repository: the adapter, model card, metrics.json, "
            "preprocessor_config.json if present, and the PNG plots; never checkpoints. Refuses a file that holds "
            "the token, and full fine-tuning runs.",
        )
    )
    add_export_arguments(
        commands.add_parser(
            "export",
            help="export a trained model as one ONNX graph (pixel_values -> embeddings), served without PEFT",
            description="Write one ONNX graph (backbone, prompts, BitFit and head; fixed image size, dynamic batch) "
            "with input `pixel_values` (B x 3 x S x S, normalised) and output `embeddings` (B x E, L2-normalised), "
            "check it against PyTorch with onnxruntime, and write the preprocessing next to it (out.json). See "
            "docs/retrieval.md, 'Serving without PEFT'.",
        )
    )
    commands.add_parser(
        "demo",
        help="offline end-to-end demo (built-in backbone and emoji benchmark); `vpdml demo --help` for options",
        add_help=False,
    )
    return parser


def _run_demo(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("vpdml.demo") is None:
        print("vpdml demo is not available in this installation.", file=sys.stderr)
        return 2
    result = importlib.import_module("vpdml.demo").main(list(argv))
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vpdml`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # the demo parses its own flags
        return _run_demo(argv[1:])
    namespace = build_parser().parse_args(argv)
    import vpdml.tuner  # noqa: F401  registers the PEFT type before any adapter is loaded

    handlers = {
        "train": run_train,
        "evaluate": run_evaluate,
        "embed": run_embed,
        "index": run_index,
        "search": run_search,
        "app": run_app,
        "push": run_push,
        "export": run_export,
    }
    try:
        handlers[namespace.command](namespace)
    # user errors (and a diverged run: NonFiniteLossError is a FloatingPointError): a message, not a traceback
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as error:
        print(f"vpdml {namespace.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
