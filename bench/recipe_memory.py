"""Whole training steps of the SOP and In-Shop recipes (their released prompt counts), at a reduced size, on CPU.

The benchmark issue asks that the SOP and In-Shop recipes run "without running out of memory on one 80 GB GPU at
batch 32", estimated on paper (docs/scale.md) and measured at reduced size. This script runs real training steps
of ``vptsp-g`` with a recipe's adapter settings (SOP: 90 prompts, 5 class prompts per layer; In-Shop: 90 and 80),
its class count (11,318 / 3,997) and its batch (32 classes x 1 image), through the trainer's own optimizer choice
(``create_optimizer``: torch AdamW for a dense table, ``RowSparseAdamW`` otherwise). What is reduced is the
backbone: a random ViT of ``--hidden`` width and ``--layers`` layers at a small image size, so that a step fits
a CPU. The class-prompt table scales with ``hidden x layers``, so the default (ViT-S width, 12 layers) keeps
SOP's table at its real size; In-Shop's 1.47B-value table needs ``--hidden 192`` here (half of ViT-S).

Per storage, in a fresh process: the table's size, the memory the estimate predicts for the table and its AdamW
moments (12 B per value), the measured resident-set growth after the first step (everything stored: the table
and its moments, the backbone, the proxies, and what the allocator keeps of the first step's activations) and its
peak over the steps (a dense table adds its gradient and AdamW's temporaries), and the median step time.

    python bench/recipe_memory.py --recipe sop                      # ViT-S width, 12 layers: SOP's real table
    python bench/recipe_memory.py --recipe inshop --hidden 192      # In-Shop's table at half width
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from memory import proc_kb  # bench/memory.py: the script's folder is on sys.path

RECIPE_CLASSES = {"sop": 11_318, "inshop": 3_997}


@dataclass
class Setting:
    recipe: str
    storage: str
    num_classes: int
    hidden: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    steps: int
    threads: int


def run_one(setting: Setting) -> dict[str, float]:
    import torch
    from transformers import ViTConfig, ViTModel

    from vpdml.training import build_model, create_optimizer
    from vpdml.training.args import RECIPES, TrainingArguments

    torch.set_num_threads(setting.threads)
    baseline_kb = proc_kb("VmRSS")
    recipe = RECIPES[setting.recipe]
    torch.manual_seed(0)
    backbone = ViTModel(
        ViTConfig(
            hidden_size=setting.hidden,
            num_hidden_layers=setting.layers,
            num_attention_heads=setting.heads,
            intermediate_size=4 * setting.hidden,
            image_size=setting.image_size,
            patch_size=setting.patch_size,
        ),
        add_pooling_layer=False,
    )
    model = build_model(
        backbone,
        "vptsp-g",
        setting.num_classes,
        **{**recipe.adapter, "class_prompt_storage": setting.storage},
    )
    args = TrainingArguments(output_dir="unused", **recipe.training)
    optimizer = create_optimizer(model, args)
    table = model.base_model.dml_proxies["default"].class_prompts
    table_values = sum(p.numel() for p in table.parameters())
    batch = args.classes_per_batch * args.samples_per_class
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, setting.image_size, setting.image_size, generator=generator)
    model.train()
    times, stored_kb = [], 0
    for step in range(setting.steps):
        labels = torch.randperm(setting.num_classes, generator=generator)[: args.classes_per_batch]
        labels = labels.repeat_interleave(args.samples_per_class)
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.dml_loss(pixels, labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
        if step == 0:  # the optimizer state exists now: what stays between steps
            optimizer.zero_grad(set_to_none=True)
            stored_kb = proc_kb("VmRSS") - baseline_kb
    peak_kb = proc_kb("VmHWM") - baseline_kb
    return {
        "table_values": table_values,
        "stored_gb": stored_kb / 2**20,
        "peak_gb": peak_kb / 2**20,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "first_step_s": times[0],
    }


def _predicted_gb(table_values: int) -> float:
    """The table and its AdamW moments, as docs/scale.md estimates them: 12 B per value (fp32). A dense table's
    gradient (4 B more) and AdamW temporaries exist only during the step: they are in the peak column."""
    return 12 * table_values / 2**30


def _run_subprocess(setting: Setting) -> dict[str, float] | str:
    command = [sys.executable, __file__, "--one", json.dumps(asdict(setting))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", choices=sorted(RECIPE_CLASSES), default="sop")
    parser.add_argument("--storages", nargs="+", default=["dense", "sparse", "low_rank"])
    parser.add_argument("--num-classes", type=int, help="default: the recipe's training classes")
    parser.add_argument("--hidden", type=int, default=384, help="ViT width (ViT-S: 384)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=32, help="reduced: 32 px = 4 patches of 16")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Setting(**json.loads(args.one)))))
        return
    classes = args.num_classes or RECIPE_CLASSES[args.recipe]
    if classes < 32:
        raise SystemExit(f"--num-classes must be at least the recipes' 32 classes per batch, got {classes}.")
    rows = []
    for storage in args.storages:
        setting = Setting(
            recipe=args.recipe,
            storage=storage,
            num_classes=classes,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            image_size=args.image_size,
            patch_size=args.patch_size,
            steps=args.steps,
            threads=args.threads,
        )
        rows.append((storage, _run_subprocess(setting)))
        print(f"  done {storage}", file=sys.stderr, flush=True)
    print(
        f"\nrecipe={args.recipe}: {classes:,} classes, batch 32 x 1, ViT width {args.hidden} x {args.layers} layers, "
        f"{args.image_size} px, random weights, CPU, {args.threads} thread(s)\n"
    )
    print(
        "| storage | class-prompt table | table + AdamW moments, estimate (GB) | stored after step 1 (GB) | "
        "peak (GB) | step s (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for storage, result in rows:
        if isinstance(result, str):
            print(f"| {storage} | {result} |")
            continue
        print(
            f"| {storage} | {result['table_values'] / 1e6:,.2f}M | "
            f"{_predicted_gb(result['table_values']):.2f} | {result['stored_gb']:.2f} | "
            f"{result['peak_gb']:.2f} | {result['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
