"""Where a training step's time goes: torch.profiler over VPT and VPTSP-G steps, grouped by kind of work.

Builds the same random-weight ViT as ``bench/speed.py`` (ViT-S/16 shape, SDPA attention) and profiles a few
training steps (forward, backward, AdamW) of each method after warm-up. Operator self times are summed into
groups: the backbone's own work (linear layers, attention, layer norms, GELU, other elementwise ops), the
prompt plumbing vpdml adds (concatenating prompts, slicing them off, gathering class prompts), the proxies and
loss, and the optimizer. Times are per step (ms, self CPU time of the operators in the group, so groups add up
to the profiled total), and the table's last column is the VPTSP-G minus VPT difference: what the
semantic-proxy branch costs and where.

    python bench/profile_step.py --quick                 # 112 px, batch 8 classes x 2, CPU, ~1 min
    python bench/profile_step.py --trace trace.json      # also write a Chrome trace of the VPTSP-G step
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import speed  # bench/speed.py builds the step this script profiles; the script's folder is on sys.path

# Operator name fragments -> group, checked in order (first match wins); the optimizer's operators are found by
# their scope instead.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimizer", ()),
    ("attention (SDPA)", ("scaled_dot_product", "_softmax", "attention")),
    ("linear layers (matmul)", ("addmm", "aten::mm", "aten::bmm", "matmul", "aten::linear")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("convolution (patch embedding)", ("conv", "im2col")),
    ("prompt plumbing (cat, slice, gather)", ("aten::cat", "slice", "index", "gather", "expand", "narrow")),
    ("proxies + loss (exp, norms, reductions)", ("exp", "logsumexp", "norm", "clamp", "sum", "mean", "max")),
    ("copies and casts", ("copy_", "aten::to", "clone", "contiguous", "_to_copy", "empty")),
    ("other elementwise", ("add", "mul", "div", "sub", "where", "fill", "zero", "sigmoid", "tanh", "rsub")),
)


# record_function scopes opened by VisualPromptDMLModel.dml_loss and torch.optim, and the autograd engine.
PHASES: tuple[tuple[str, str], ...] = (
    ("vpdml.sample_pass", "forward: sample pass (shared prompts)"),
    ("vpdml.proxy_pass", "forward: proxy pass (class prompts)"),
    ("vpdml.fused_passes", "forward: fused sample + proxy pass"),
    ("vpdml.proxy_state", "forward: semantic-proxy state (GRU/EMA)"),
    ("vpdml.proxies_and_loss", "forward: proxy mix + Proxy Anchor"),
    ("autograd::engine", "backward (all of it)"),
    ("Optimizer.", "optimizer step (AdamW)"),
)


def phase_of(event: object) -> str:
    """The phase whose scope encloses ``event`` (walking up its CPU parents)."""
    node = event
    while node is not None:
        for scope, phase in PHASES:
            if node.name.startswith(scope):
                return phase
        node = node.cpu_parent
    return "other (zero_grad, Python glue)"


def group_of(operator: str) -> str:
    name = operator.lower()
    for group, fragments in GROUPS:
        if any(fragment in name for fragment in fragments):
            return group
    return "other"


def profile_method(
    method: str, setting: speed.Setting, steps: int
) -> tuple[dict[str, float], dict[str, float], float, object]:
    """Self CPU ms per step by operator group and by phase, the total, and the profiler (for a trace)."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = speed.make_step(method, setting)  # the step bench/speed.py times
    for _ in range(setting.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setting.device == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
    groups: dict[str, float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        self_time = _self_time(event, setting.device)
        if self_time <= 0:
            continue
        ms = self_time / 1000 / steps
        phase = phase_of(event)
        groups["optimizer" if phase.startswith("optimizer") else group_of(event.name)] += ms
        phases[phase] += ms
    return dict(groups), dict(phases), sum(groups.values()), profiler


def _self_time(event: object, device: str) -> float:
    """Microseconds the operator itself took: on the GPU for CUDA runs (kernels), on the CPU otherwise."""
    return event.self_device_time_total if device == "cuda" else event.self_cpu_time_total


def top_operators(profiler: object, steps: int, count: int, device: str) -> list[tuple[str, float, int]]:
    events = sorted(profiler.key_averages(), key=lambda e: _self_time(e, device), reverse=True)
    return [(e.key, _self_time(e, device) / 1000 / steps, e.count // steps) for e in events[:count]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="112 px, batch 8 classes x 2, 3 profiled steps")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes-per-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["vpt", "vptsp-g-1img"],
        choices=[m for m in speed.METHODS if m not in speed.INFERENCE_METHODS],
        help="the first is the reference of the difference column",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="profile every method this many times, keep the fastest"
    )
    parser.add_argument("--top", type=int, default=12, help="also list the N most expensive operators")
    parser.add_argument("--trace", help="write a Chrome trace of the last method's profiled steps here")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.classes_per_batch = 112, 8
    setting = speed.Setting(
        image_size=args.image_size,
        classes_per_batch=args.classes_per_batch,
        samples_per_class=2,
        steps=args.steps,
        warmup=1,
        device=args.device,
        dtype="fp32",
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        num_prompts=args.num_prompts,
        num_classes=100,
    )
    print(f"setting: {setting.__dict__}", flush=True)
    results, profilers = {}, {}
    for _ in range(args.rounds):  # each method keeps its least disturbed round (the machine may be shared)
        for method in args.methods:
            groups, phases, total, profiler = profile_method(method, setting, args.steps)
            if method not in results or total < results[method][2]:
                results[method], profilers[method] = (groups, phases, total), profiler
            print(f"  {method}: {total:.0f} ms/step of operator time", file=sys.stderr, flush=True)
    totals = [results[m][2] for m in args.methods]
    print_breakdown("operator group", [g for g, _ in GROUPS] + ["other"], 0, results, args.methods, totals)
    phase_names = [p for _, p in PHASES] + ["other (zero_grad, Python glue)"]
    print_breakdown("phase", phase_names, 1, results, args.methods, totals)
    for method in args.methods:
        print(f"\nTop operators, {method} (self ms per step, calls per step):\n")
        print("| operator | group | ms | calls |\n|---|---|---:|---:|")
        for key, ms, calls in top_operators(profilers[method], args.steps, args.top, args.device):
            print(f"| `{key}` | {group_of(key)} | {ms:.1f} | {calls} |")
    if args.trace:
        profilers[args.methods[-1]].export_chrome_trace(args.trace)
        print(f"\ntrace: {args.trace}")


def print_breakdown(
    title: str, names: list[str], which: int, results: dict, methods: list[str], totals: list[float]
) -> None:
    """One markdown table: ms per step of each group (or phase) for each method, and last minus first."""
    print(f"\n| {title} (ms per step) | {' | '.join(methods)} | {methods[-1]} - {methods[0]} |")
    print("|---|" + "---:|" * (len(methods) + 1))
    for name in names:
        values = [results[m][which].get(name, 0.0) for m in methods]
        if any(values):
            cells = " | ".join(f"{v:.1f}" for v in values)
            print(f"| {name} | {cells} | {values[-1] - values[0]:+.1f} |")
    print(f"| **total** | {' | '.join(f'{t:.1f}' for t in totals)} | {totals[-1] - totals[0]:+.1f} |")


if __name__ == "__main__":
    main()
