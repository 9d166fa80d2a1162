"""Training-step time and peak memory of every method, side by side in one run.

Times are medians over a few steps after warm-up, quoted as ratios to the frozen backbone's forward pass (the
floor) and to VPT, because the machine is noisy: only ratios measured in the same run are comparable. Each
method runs in a fresh subprocess so its peak resident memory is its own.

    python bench/speed.py --quick            # ViT-S/16 shape, 112 px, batch 8 classes x 2, 3 rounds (CPU, ~6 min)
    python bench/speed.py --image-size 224 --classes-per-batch 32 --device cuda --dtype bf16

``frozen-forward`` and ``vptsp-g-embed`` are forward passes without gradients (``vptsp-g-embed``: a VPTSP-G adapter
embedding a batch, what retrieval costs at inference); every other row is one training step (forward, backward,
AdamW). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the worker's peak RSS on CPU.

``vptsp-g`` is the preset (its proxy pass re-encodes one image per class through every block, with a random quarter
of its patch tokens: ``semantic_images_per_class=1, proxy_pass_tokens=0.25``). The other ``vptsp-g-*`` training rows
re-encode every batch image unless named ``-1img`` (one per class), keep every token unless named ``-tokensP``, and
run the paper's whole second pass unless named ``-lastN`` (the last N blocks): ``vptsp-g-whole`` is the paper's
form; ``-eq``: as many class prompts as shared prompts, ``-fused``: both passes as one, ``-every4``: the proxy pass
on every 4th step only, ``-tokensP``: the proxy pass keeps a random P% of each image's patch tokens. Prompts enter
each block's attention as keys and values only (vpdml's default); a ``-fulltokens`` row makes them full tokens whose
outputs every block computes and drops, as the official code does: ``vptsp-g-whole-fulltokens`` is the official
VPTSP-G step's shape and cost (with the official code's plain ``torch.optim.AdamW``; every other row uses the
training loop's fused AdamW). An ``-outputadd`` row adds the BitFit offsets to each module's output, as vpdml did
before they joined the module's bias.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

METHODS = (
    "frozen-forward",
    "linear",
    "vpt",
    "vpt-bitfit",
    "vptsp-m",
    "vptsp-g",
    "vptsp-g-whole",
    "vptsp-g-1img",
    "vptsp-g-1img-eq",
    "vptsp-g-1img-eq-fused",
    "vptsp-g-1img-every4",
    "vptsp-g-last2",
    "vptsp-g-1img-last2",
    "vptsp-g-last3",
    "vptsp-g-last4",
    "vptsp-g-1img-last3",
    "vptsp-g-1img-last4",
    "vptsp-g-1img-last6",
    "vptsp-g-1img-tokens50",
    "vptsp-g-1img-tokens25",
    "vptsp-g-1img-tokens12",
    "lora",
    "full-finetune",
    "vptsp-g-embed",
    "vpt-bitfit-fulltokens",
    "vptsp-g-fulltokens",
    "vptsp-g-whole-fulltokens",
    "vptsp-g-embed-fulltokens",
    "vpt-bitfit-outputadd",
    "vptsp-g-outputadd",
    "vptsp-g-embed-outputadd",
)
#: proxy pass on every k-th step only (``proxy_pass_every``): such a method is timed over whole k-step cycles, by the
#: mean step (a median would pick the cheap steps)
PROXY_PASS_EVERY = {"vptsp-g-1img-every4": 4}
#: ``-lastN``: the proxy pass runs through the last N blocks only, from the sample pass's hidden states
#: (``proxy_pass_layers=N``, a shared trunk)
LAST_BLOCKS_SUFFIX = "-last"
#: ``-tokensP``: the proxy pass keeps a random P% of each image's patch tokens (``proxy_pass_tokens=P/100``)
TOKENS_SUFFIX = "-tokens"
#: ``-fulltokens``: prompts are full tokens whose outputs every block computes and drops, as in the official code
#: (``prompts_as_keys = False``); without it they enter attention as keys and values only
FULL_TOKENS_SUFFIX = "-fulltokens"
#: the row with the official VPTSP-G step's shape: the paper's two whole passes over every image, full tokens
OFFICIAL_SHAPE = "vptsp-g-whole-fulltokens"
# Forward-only rows: the frozen backbone (the floor) and embedding with a trained VPTSP-G adapter (inference:
# shared prompts + head; class prompts and proxies are not used).
EMBED_PREFIX = "vptsp-g-embed"
INFERENCE_METHODS = ("frozen-forward", *(m for m in METHODS if m.startswith(EMBED_PREFIX)))
#: ``-outputadd``: BitFit offsets are added to each biased module's output (vpdml before 2026-12-03) instead of
#: joining its bias
OUTPUT_ADD_SUFFIX = "-outputadd"


@dataclass
class Setting:
    image_size: int
    classes_per_batch: int
    samples_per_class: int
    steps: int
    warmup: int
    device: str
    dtype: str
    hidden_size: int
    layers: int
    heads: int
    num_prompts: int
    num_classes: int
    compile: bool = False


def _build(method: str, setting: Setting):
    model = _build_model(method.removesuffix(FULL_TOKENS_SUFFIX).removesuffix(OUTPUT_ADD_SUFFIX), setting)
    if method.endswith(FULL_TOKENS_SUFFIX):
        model.base_model.prompts_as_keys = False
    if method.endswith(OUTPUT_ADD_SUFFIX):
        for forward in model.base_model._bias_forwards:
            forward.fusable = False
    return model


def _build_model(method: str, setting: Setting):
    import torch
    from peft import get_peft_model
    from transformers import ViTConfig, ViTModel

    import vpdml

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=setting.hidden_size,
        num_hidden_layers=setting.layers,
        num_attention_heads=setting.heads,
        intermediate_size=4 * setting.hidden_size,
        image_size=setting.image_size,
        patch_size=16,
        attn_implementation="sdpa",
    )
    backbone = ViTModel(config, add_pooling_layer=False)
    if method == "frozen-forward":
        return backbone.requires_grad_(False)
    if method == "full-finetune":
        return vpdml.FullFineTuningDML(backbone, num_classes=setting.num_classes)
    if method == "lora":
        return vpdml.LoRADML(backbone, num_classes=setting.num_classes)
    name, overrides = method, {}
    if method.startswith("vptsp-g-") and method != "vptsp-g-embed":
        # variant rows re-encode every image unless they say `-1img` (the preset re-encodes one per class), keep
        # every token unless `-tokensP`, and run a whole second pass unless `-lastN`
        name = "vptsp-g"
        overrides["semantic_images_per_class"] = 1 if method.startswith("vptsp-g-1img") else None
        overrides["proxy_pass_tokens"] = None
        overrides["proxy_pass_layers"] = None
    if method in PROXY_PASS_EVERY:
        overrides["proxy_pass_every"] = PROXY_PASS_EVERY[method]
    if LAST_BLOCKS_SUFFIX in method:
        overrides["proxy_pass_layers"] = int(method.rsplit(LAST_BLOCKS_SUFFIX, 1)[1])
    if TOKENS_SUFFIX in method:
        overrides["proxy_pass_tokens"] = int(method.rsplit(TOKENS_SUFFIX, 1)[1]) / 100
    if method.startswith(
        "vptsp-g-1img-eq"
    ):  # as many class prompts as shared prompts: one fused pass possible
        overrides.update(class_prompts=setting.num_prompts, fuse_proxy_pass=method.endswith("-fused"))
    if method == "vptsp-g-embed":
        name = "vptsp-g"
    if name != "linear":  # an explicit num_prompts would override the linear preset's 0 (no prompts)
        overrides["num_prompts"] = setting.num_prompts
    peft_config = vpdml.VisualPromptDMLConfig.for_method(name, num_classes=setting.num_classes, **overrides)
    return get_peft_model(backbone, peft_config)


def make_step(method: str, setting: Setting) -> tuple[Callable[[], None], list]:
    """The model of ``method`` on a random batch, as ``(one training step or forward pass, trainable params)``."""
    import torch

    from vpdml.training.optim import fused_adamw

    model = _build(method, setting).to(setting.device)
    if setting.compile:  # regional torch.compile of every block; the warm-up steps absorb the compile time
        from peft import PeftModel

        from vpdml.modules.backbones import compile_blocks

        backbone = (
            model.base_model.model if isinstance(model, PeftModel) else getattr(model, "backbone", model)
        )
        compile_blocks(backbone)
    model.train(method not in INFERENCE_METHODS)
    batch = setting.classes_per_batch * setting.samples_per_class
    pixels = torch.randn(batch, 3, setting.image_size, setting.image_size, device=setting.device)
    labels = torch.arange(setting.classes_per_batch, device=setting.device).repeat_interleave(
        setting.samples_per_class
    )
    params = [p for p in model.parameters() if p.requires_grad] if method not in INFERENCE_METHODS else []
    # the training loop's AdamW; the official step's shape keeps the official code's plain torch.optim.AdamW (a
    # per-tensor loop on CPU, foreach kernels on CUDA)
    adamw = torch.optim.AdamW if method == OFFICIAL_SHAPE else fused_adamw
    optimizer = adamw(params, lr=1e-4) if params else None
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting.dtype]

    def step() -> None:
        with torch.autocast(setting.device, dtype=dtype, enabled=dtype is not None):
            if method == "frozen-forward":
                with torch.no_grad():
                    model(pixel_values=pixels)
                return
            if method.startswith(EMBED_PREFIX):
                with torch.no_grad():
                    model.embed(pixels)
                return
            loss = model.dml_loss(pixels, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, params


def _run_one(method: str, setting: Setting) -> dict[str, float]:
    """Runs inside the subprocess: time `steps` training steps (or forward passes for the floor)."""
    import torch

    step, params = make_step(method, setting)
    batch = setting.classes_per_batch * setting.samples_per_class
    every = PROXY_PASS_EVERY.get(method, 1)
    warmup = math.ceil(setting.warmup / every) * every  # the timed steps start a cycle
    steps = math.ceil(setting.steps / every) * every
    times = []
    for index in range(warmup + steps):
        if setting.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if setting.device == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if setting.device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    trainable = sum(p.numel() for p in params)
    step_s = statistics.fmean(times) if every > 1 else statistics.median(times)
    return {"step_s": step_s, "peak_mib": peak, "trainable": trainable, "images": batch}


def _measure(method: str, setting: Setting) -> dict[str, float]:
    payload = json.dumps({"method": method, "setting": setting.__dict__})
    result = subprocess.run(
        [sys.executable, __file__, "--worker", payload], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict[str, float]]) -> None:
    floor = results["frozen-forward"]["step_s"]
    vpt = results.get("vpt", {}).get("step_s")
    print(
        "| method | step (ms) | x frozen forward | x VPT | images/s | peak memory (MiB) | trainable params |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, row in results.items():
        step = row["step_s"]
        ratio_vpt = f"{step / vpt:.2f}" if vpt else "-"
        print(
            f"| {method} | {1000 * step:.0f} | {step / floor:.2f} | {ratio_vpt} | {row['images'] / step:.1f} | "
            f"{row['peak_mib']:.0f} | {int(row['trainable']):,} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CPU-sized run: 112 px, 8 classes x 2, 3 steps")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes-per-batch", type=int, default=32)
    parser.add_argument("--samples-per-class", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--hidden-size", type=int, default=384, help="384 = ViT-S, 768 = ViT-B")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every method this many times, keep each one's fastest round",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each block (use --warmup >= 2: shapes vary)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(_run_one(job["method"], Setting(**job["setting"]))))
        return
    if args.quick:
        # compiled blocks see a new shape in the first steps (sample pass, proxy pass): two warm-up steps then
        args.image_size, args.classes_per_batch, args.steps = 112, 8, 3
        args.warmup = 2 if args.compile else 1
        args.rounds = max(args.rounds, 3)
    setting = Setting(
        image_size=args.image_size,
        classes_per_batch=args.classes_per_batch,
        samples_per_class=args.samples_per_class,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        num_prompts=args.num_prompts,
        num_classes=args.num_classes,
        compile=args.compile,
    )
    methods = ["frozen-forward", *[m for m in args.methods if m != "frozen-forward"]]
    print(f"setting: {setting.__dict__}", flush=True)
    results: dict[str, dict[str, float]] = {}
    for round_index in range(args.rounds):
        # Every round runs every method once, in order; a method keeps its fastest round. Rounds spread the
        # methods over time, so a burst of load from other processes slows one round of a method, not all.
        for method in methods:
            run = _measure(method, setting)
            if method not in results or run["step_s"] < results[method]["step_s"]:
                results[method] = run
            print(
                f"  round {round_index + 1}/{args.rounds} {method}: {1000 * run['step_s']:.0f} ms/step",
                file=sys.stderr,
                flush=True,
            )
    print_table(results)


if __name__ == "__main__":
    main()
