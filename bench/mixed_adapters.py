"""Throughput of mixed-adapter batches vs switching adapters between single-adapter batches.

Serving several domains from one frozen backbone: 8 adapters, requests for all of them. Either one forward pass
carries every adapter's images (`embed(pixels, adapter_names=[...])`), or the requests are grouped and served one
adapter at a time (`embed(pixels[group], adapter_name=...)`). Times are measured side by side in one run, the rows
taking turns (one batch each per round; the median over rounds is reported). A fourth row runs the switching
batch sizes on one adapter, to separate the cost of switching from that of smaller batches.

    python bench/mixed_adapters.py                  # ViT-S/16 shape, 224 px, batch 64, 8 adapters (CPU: ~3 min)
    python bench/mixed_adapters.py --image-size 112 --repeats 2
    python bench/mixed_adapters.py --threads 1 --repeats 5   # a shared CPU: 2 threads stall when a core is busy
    python bench/mixed_adapters.py --device cuda --repeats 10   # on a GPU (times are synchronised)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTModel

import vpdml


def build(num_adapters: int, hidden: int, layers: int, heads: int, image_size: int, prompts: int):
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image_size,
        patch_size=16,
    )
    adapter = vpdml.VisualPromptDMLConfig(num_prompts=prompts, semantic_proxies="none", bitfit=True)
    model = get_peft_model(ViTModel(config, add_pooling_layer=False), adapter)
    for index in range(1, num_adapters):
        model.add_adapter(
            f"domain{index}",
            vpdml.VisualPromptDMLConfig(num_prompts=prompts, semantic_proxies="none", bitfit=True),
        )
    return model.eval()


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function. The functions take turns (one call each per round), so a change in the
    machine's load during the run slows all of them alike instead of whichever happened to run then."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    synchronize()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.adapters, args.hidden_size, args.layers, args.heads, args.image_size, args.num_prompts)
    model = model.to(device)
    names = ["default"] + [f"domain{i}" for i in range(1, args.adapters)]
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    per_image = [names[i % len(names)] for i in range(args.batch)]
    groups = {name: [i for i, n in enumerate(per_image) if n == name] for name in names}

    @torch.no_grad()
    def mixed() -> None:
        model.embed(pixels, adapter_names=per_image)

    @torch.no_grad()
    def switching() -> None:
        for name, rows in groups.items():
            model.set_adapter(name)
            model.embed(pixels[rows])

    @torch.no_grad()
    def single_adapter() -> None:
        model.embed(pixels, adapter_name="default")

    @torch.no_grad()
    def single_adapter_split() -> (
        None
    ):  # switching's batch sizes without switching: isolates the batch-size effect
        model.set_adapter("default")
        for rows in groups.values():
            model.embed(pixels[rows])

    functions = {
        "one adapter, whole batch (reference)": single_adapter,
        f"mixed batch ({args.adapters} adapters, one pass)": mixed,
        f"switching ({args.adapters} single-adapter batches)": switching,
        f"one adapter, same {args.adapters} smaller batches (no switching)": single_adapter_split,
    }
    results = timed(functions, args.repeats, device)
    reference = next(iter(results.values()))
    print(
        f"ViT hidden {args.hidden_size} x {args.layers} layers, {args.image_size} px, batch {args.batch}, "
        f"{args.num_prompts} prompts, BitFit, median of {args.repeats}, "
        + (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads"
        )
    )
    print("| serving | ms / batch | images/s | x one adapter |")
    print("|---|---:|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {1000 * seconds:.0f} | {args.batch / seconds:.1f} | {seconds / reference:.2f} |")


if __name__ == "__main__":
    main()
