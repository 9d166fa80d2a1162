"""Step time and memory of the class-prompt branch as the number of classes grows: dense vs sparse vs low-rank.

One training step of the branch: gather the batch's class prompts, a tiny forward (token MLP -> mean -> head ->
cosine loss), backward, optimizer step (torch AdamW for the dense table, vpdml's RowSparseAdamW otherwise). The
backbone is left out on purpose so the table's own cost is what is measured. ``--branch semantic`` adds the rest
of the semantic-proxy branch (proxy head, GRU, the (C, E) learnable proxies and state, Proxy Anchor), scored
against every class or, with ``--proxy-negatives N``, against the batch's classes and N sampled others (row-sparse
learnable proxies; the config's ``proxy_negatives``).

Each configuration runs in a fresh subprocess. Memory:

* ``stored``: parameters and optimizer state between steps (the table and its AdamW moments dominate);
* ``step``: what a step allocates on top (gradients, gathered rows, optimizer temporaries);
* ``peak``: stored + step, i.e. what must fit on the compute device. With ``--device cuda`` and storage
  ``sparse-offload`` the stored table lives in (pinned) host memory instead and is reported as ``host``.

On CPU memory is resident-set growth (Linux /proc, peak reset before the timed steps); on CUDA it is the
allocator's counters. Times are medians (and minima, the least disturbed step on a shared machine) after warm-up; only numbers from one
run are comparable.

    python bench/scale.py                                    # CPU, ~2 min, <= ~5 GB
    python bench/scale.py --branch semantic
    python bench/scale.py --branch semantic --proxy-negatives 1024 --storages low_rank --classes 100 100000 1000000 \
        --embedding-dim 512 --max-gb 16
    python bench/scale.py --device cuda --layers 12 --storages dense sparse sparse-offload low_rank
    python bench/scale.py --device cuda --branch semantic --storages sparse-offload --proxy-negatives 1024 \
        --proxy-offload --classes 100 100000 1000000 --embedding-dim 512 --max-gb 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from memory import proc_kb, reset_peak_rss  # bench/memory.py: the script's folder is on sys.path

CLASS_COUNTS = (100, 11_318, 100_000)
STORAGES = ("dense", "sparse", "low_rank")


@dataclass
class Setting:
    branch: str
    storage: str
    num_classes: int
    batch_classes: int
    layers: int
    class_prompts: int
    hidden: int
    embedding_dim: int
    rank: int
    device: str
    steps: int
    warmup: int
    max_seconds: float
    threads: int
    negatives: int | None = None
    proxy_offload: bool = False


# ------------------------------------------------------------------------------------------------- memory
def _tensor_bytes(tensors) -> dict[str, int]:
    """Bytes of (dense) tensors per device type."""
    found: dict[str, int] = {}
    for tensor in tensors:
        if hasattr(tensor, "nbytes") and hasattr(tensor, "device"):
            found[tensor.device.type] = found.get(tensor.device.type, 0) + tensor.nbytes
    return found


# ------------------------------------------------------------------------------------------------ one run
def _build(setting: Setting):
    import torch
    from torch import nn

    from vpdml.modules.row_sparse import RowSparseAdamW, has_row_sparse_parameters
    from vpdml.proxies.bank import ProxyBank

    torch.manual_seed(0)
    device = torch.device(setting.device)
    counts = [setting.class_prompts] * setting.layers
    storage = "sparse" if setting.storage == "sparse-offload" else setting.storage
    bank = ProxyBank(
        num_classes=setting.num_classes,
        embedding_dim=setting.embedding_dim,
        hidden_size=setting.hidden,
        semantic_proxies="gru",
        class_prompt_counts=counts,
        keep_ratio=0.8,
        gru_dropout=0.0,
        mix_alpha=0.2,
        class_prompt_storage=storage,
        class_prompt_rank=setting.rank,
        class_prompt_offload=setting.storage == "sparse-offload",
        negatives=setting.negatives,
        offload=setting.proxy_offload,
    )
    if setting.branch == "class-prompts":  # keep only what the class-prompt branch trains
        del bank.learnable, bank.accumulator, bank.semantic_state
    tiny = nn.Sequential(nn.Linear(setting.hidden, setting.hidden), nn.GELU())  # stands in for the backbone
    head = nn.Linear(setting.hidden, setting.embedding_dim)  # stands in for the embedding head
    modules = nn.ModuleDict({"bank": bank, "tiny": tiny, "head": head}).to(device)
    params = [p for p in modules.parameters() if p.requires_grad]
    if not has_row_sparse_parameters(modules):
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    else:
        optimizer = RowSparseAdamW(params, lr=1e-4, weight_decay=0.05)
    return modules, optimizer


def _step(modules, optimizer, labels, targets, branch: str) -> None:
    import torch
    import torch.nn.functional as F

    from vpdml.proxies.loss import proxy_anchor_loss

    bank, tiny, head = modules["bank"], modules["tiny"], modules["head"]
    optimizer.zero_grad(set_to_none=True)
    prompts = torch.cat([p for p in bank.class_prompts.gather(labels) if p is not None], dim=1)  # (B, K, D)
    features = tiny(prompts).mean(dim=1)
    if branch == "class-prompts":
        loss = 1 - F.cosine_similarity(head(features), targets).mean()
    else:
        semantic = bank.proxy_head(features)
        rows = bank.accumulate(semantic, labels)
        embeddings = F.normalize(head(features.detach()), dim=-1)
        proxies = bank.loss_proxies(labels, rows)
        loss = proxy_anchor_loss(embeddings, labels, proxies.proxies, **proxies.loss_kwargs())
    loss.backward()
    optimizer.step()


def run_one(setting: Setting) -> dict[str, float]:
    import torch

    import vpdml.proxies  # noqa: F401  (imported before the baseline: its libraries are not the branch's memory)

    torch.set_num_threads(setting.threads)
    device = torch.device(setting.device)
    cuda = device.type == "cuda"
    baseline_kb = proc_kb("VmRSS")
    modules, optimizer = _build(setting)
    generator = torch.Generator().manual_seed(1)
    total = setting.warmup + setting.steps
    batches = [  # distinct classes per batch (SOP's 32 classes x 1 image), drawn before timing
        torch.randint(0, setting.num_classes, (setting.batch_classes * 4,), generator=generator).unique()[
            : setting.batch_classes
        ]
        for _ in range(total)
    ]
    batches = [b[torch.randperm(len(b), generator=generator)].to(device) for b in batches]
    targets = torch.randn(setting.batch_classes, setting.embedding_dim, generator=generator).to(device)
    for labels in batches[: setting.warmup]:  # creates the optimizer state
        _step(modules, optimizer, labels, targets[: len(labels)], setting.branch)
    with (
        torch.no_grad()
    ):  # write every page of the (lazily zero-mapped) state once: steady state, as after an epoch
        for state in optimizer.state.values():
            for tensor in state.values():
                if isinstance(tensor, torch.Tensor):
                    tensor.mul_(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stored_before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        stored_before = proc_kb("VmRSS") * 1024
    times = []
    started = time.perf_counter()
    for labels in batches[setting.warmup :]:
        begin = time.perf_counter()
        _step(modules, optimizer, labels, targets[: len(labels)], setting.branch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        if len(times) >= 3 and time.perf_counter() - started > setting.max_seconds:
            break
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        stored = stored_before
    else:
        peak = proc_kb("VmHWM") * 1024 - baseline_kb * 1024
        stored = stored_before - baseline_kb * 1024
    state = [t for s in optimizer.state.values() for t in s.values()]
    by_device = _tensor_bytes([*modules.parameters(), *modules.buffers(), *state])
    return {
        "step_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "steps": len(times),
        "peak_mb": peak / 2**20,
        "stored_mb": stored / 2**20,
        "step_mb": max(peak - stored, 0) / 2**20,  # RSS can dip below the pre-step value (freed pages)
        "host_mb": by_device.get("cpu", 0) / 2**20 if cuda else 0.0,
        "table_elements": _table_elements(modules["bank"].class_prompts),
    }


def _table_elements(table) -> int:
    return sum(p.numel() for p in table.parameters())


# --------------------------------------------------------------------------------------------------- driver
def _estimate_gb(setting: Setting) -> float:
    """Rough peak of a run (fp32): the table with its gradient and AdamW moments, plus the dense proxies."""
    per_class = setting.layers * setting.class_prompts * setting.hidden
    table = setting.num_classes * per_class
    factor = {"dense": 5, "sparse": 3, "sparse-offload": 3, "low_rank": 0}[setting.storage]
    elements = factor * table + (4 * setting.rank * per_class + 3 * setting.num_classes * setting.rank)
    if (
        setting.branch == "semantic"
    ):  # O with its moments and P; the full loss adds O's gradient and temporaries
        elements += (4 if setting.negatives else 8) * setting.num_classes * setting.embedding_dim
    return 4 * elements / 2**30


def _run_subprocess(setting: Setting, timeout: float) -> dict[str, float] | str:
    command = [sys.executable, __file__, "--one", json.dumps(asdict(setting))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _label(setting: Setting) -> str:
    label = setting.storage + (f" + {setting.negatives:,} negatives" if setting.negatives else "")
    return label + (" (proxies offloaded)" if setting.proxy_offload else "")


def _print_table(rows: list[tuple[Setting, dict[str, float] | str]], device: str) -> None:
    host = device.startswith("cuda")
    header = "| classes | storage | table params | step ms (median / min) | peak MB | stored MB | step MB |"
    header += " host MB |" if host else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for setting, result in rows:
        start = f"| {setting.num_classes:,} | {_label(setting)} |"
        if isinstance(result, str):
            print(f"{start} {result} |")
            continue
        line = (
            f"{start} {result['table_elements'] / 1e6:.2f}M | {result['step_ms']:.1f} / {result['min_ms']:.1f} | "
            f"{result['peak_mb']:.0f} | "
            f"{result['stored_mb']:.0f} | {result['step_mb']:.0f} |"
        )
        print(line + (f" {result['host_mb']:.0f} |" if host else ""))


def _print_ratios(rows: list[tuple[Setting, dict[str, float] | str]]) -> None:
    """Largest class count over smallest, per storage: the goal is <= 1.2x for sparse on time and memory."""
    by_storage: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for setting, result in rows:
        if isinstance(result, dict):
            by_storage.setdefault(_label(setting), []).append((setting.num_classes, result))
    for storage, results in by_storage.items():
        if len(results) < 2:
            continue
        (small_c, small), (large_c, large) = (
            min(results, key=lambda r: r[0]),
            max(results, key=lambda r: r[0]),
        )
        print(
            f"{storage}: {large_c:,} vs {small_c:,} classes: time x{large['step_ms'] / small['step_ms']:.2f} "
            f"(min x{large['min_ms'] / small['min_ms']:.2f}), "
            f"step memory x{max(large['step_mb'], 1) / max(small['step_mb'], 1):.2f}, "
            f"peak x{large['peak_mb'] / max(small['peak_mb'], 1):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--branch", choices=("class-prompts", "semantic"), default="class-prompts")
    parser.add_argument("--storages", nargs="+", default=list(STORAGES))
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASS_COUNTS))
    parser.add_argument(
        "--batch-classes", type=int, default=32, help="distinct classes per batch (SOP: 32 x 1)"
    )
    parser.add_argument("--layers", type=int, default=1, help="layers with class prompts (ViT-S: 12)")
    parser.add_argument("--class-prompts", type=int, default=5, help="class prompts per layer (SOP: 5)")
    parser.add_argument("--hidden", type=int, default=384, help="ViT width (ViT-S: 384)")
    parser.add_argument("--embedding-dim", type=int, default=384)
    parser.add_argument("--rank", type=int, default=64, help="rank of the low_rank table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="stop timing a config after this")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)"
    )
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip configs estimated above this")
    parser.add_argument(
        "--proxy-negatives",
        type=int,
        default=None,
        help="semantic branch: sampled negative proxies per step (default: every class, the exact loss)",
    )
    parser.add_argument(
        "--proxy-offload",
        action="store_true",
        help="with --proxy-negatives: keep the learnable proxies and state in host memory (on a GPU: host MB)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Setting(**json.loads(args.one)))))
        return
    rows = []
    for storage in args.storages:
        for classes in args.classes:
            setting = Setting(
                branch=args.branch,
                storage=storage,
                num_classes=classes,
                batch_classes=args.batch_classes,
                layers=args.layers,
                class_prompts=args.class_prompts,
                hidden=args.hidden,
                embedding_dim=args.embedding_dim,
                rank=args.rank,
                device=args.device,
                steps=args.steps,
                warmup=args.warmup,
                max_seconds=args.max_seconds,
                threads=args.threads,
                negatives=args.proxy_negatives,
                proxy_offload=args.proxy_offload,
            )
            estimate = _estimate_gb(setting)
            if estimate > args.max_gb:
                rows.append((setting, f"skipped: needs ~{estimate:.0f} GB (> --max-gb {args.max_gb:g})"))
                continue
            rows.append((setting, _run_subprocess(setting, timeout=600)))
            print(f"  done {storage} {classes:,}", file=sys.stderr)
    per_class = args.layers * args.class_prompts * args.hidden
    print(
        f"\nbranch={args.branch} device={args.device} batch={args.batch_classes} classes x 1, class prompts "
        f"{args.class_prompts} x {args.layers} layers x {args.hidden} = {per_class:,} floats per class, "
        f"E={args.embedding_dim}, rank={args.rank}\n"
    )
    _print_table(rows, args.device)
    print()
    _print_ratios(rows)


if __name__ == "__main__":
    main()
