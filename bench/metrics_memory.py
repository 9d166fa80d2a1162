"""Time and peak memory of chunked retrieval metrics vs a plain full-matrix computation.

Usage::

    PYTHONPATH=src python bench/metrics_memory.py                 # 10k full vs chunked, then 60k chunked
    PYTHONPATH=src python bench/metrics_memory.py --large-size 0  # skip the 60k run

Each measurement runs in a fresh Python process, so memory that one run's allocator keeps around cannot
hide in another run's baseline. Peak memory is the largest resident set size (sampled every millisecond
from /proc/self/statm) above the resident size just before the run, i.e. what the metric computation
itself adds on top of the embeddings. Data: Gaussian class clusters (about 60 items per class),
embeddings float32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RECALL_AT = (1, 2, 4, 8)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def resident_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


class PeakResidentSampler:
    """Samples the resident set size in a background thread (matmuls release the GIL)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakResidentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def clustered_data(
    num_items: int, dim: int, items_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 embeddings around one random center per class, labels in random order."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = max(1, num_items // items_per_class)
    labels = torch.randint(num_classes, (num_items,), generator=generator)
    embeddings = torch.randn(num_classes, dim, generator=generator)[labels]
    embeddings += 3.0 * torch.randn(num_items, dim, generator=generator)
    return embeddings, labels


def full_matrix_metrics(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The plain way: the whole N x N similarity matrix, then one top-k over it."""
    unit = F.normalize(embeddings, dim=1)
    similarities = unit @ unit.T
    similarities.fill_diagonal_(-float("inf"))
    positives = torch.bincount(labels)[labels] - 1
    counted = positives > 0
    k = max(max(RECALL_AT), int(positives.max()))
    _, neighbors = similarities.topk(k, dim=1)
    del similarities
    neighbors = neighbors[counted]
    hits = labels[neighbors] == labels[counted].unsqueeze(1)
    r = positives[counted].unsqueeze(1)
    ranks = torch.arange(1, k + 1)
    within_r = hits & (ranks <= r)
    precision = hits.cumsum(dim=1).double() / ranks
    result = {f"recall@{K}": hits[:, :K].any(dim=1).double().mean().item() for K in RECALL_AT}
    result["map@r"] = ((precision * within_r).sum(dim=1) / r.squeeze(1)).mean().item()
    result["r_precision"] = (within_r.sum(dim=1) / r.squeeze(1)).double().mean().item()
    result["num_queries"] = int(counted.sum())
    return result


def warm_up_kernels() -> None:
    """Start the BLAS/OpenMP thread pools before the baseline, so neither method is billed for them."""
    for dtype in (torch.float32, torch.float64):
        block = torch.randn(256, 256, dtype=dtype)
        (block @ block.T).topk(8, dim=1)


def run_worker(method: str, num_items: int, dim: int, items_per_class: int, chunk_size: int) -> None:
    """Measure one computation in this (fresh) process and print a JSON line."""
    from vpdml.retrieval.metrics import retrieval_metrics

    embeddings, labels = clustered_data(num_items, dim, items_per_class, seed=0)
    warm_up_kernels()
    gc.collect()
    baseline = resident_bytes()
    start = time.perf_counter()
    with PeakResidentSampler() as sampler:
        if method == "full":
            metrics = full_matrix_metrics(embeddings, labels)
        else:
            metrics = retrieval_metrics(
                embeddings,
                labels,
                recall_at=RECALL_AT,
                chunk_size=chunk_size,
                show_progress=num_items > 20_000,
            )
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_extra_bytes": sampler.peak - baseline, "metrics": metrics}))


def measure(method: str, num_items: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        "--num-items",
        str(num_items),
        "--dim",
        str(args.dim),
        "--items-per-class",
        str(args.items_per_class),
        "--chunk-size",
        str(args.chunk_size),
    ]
    output = subprocess.run(command, check=True, capture_output=False, stdout=subprocess.PIPE, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-size", type=int, default=10_000, help="N where full and chunked are compared")
    parser.add_argument("--large-size", type=int, default=60_000, help="N of the chunked-only run (0: skip)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--items-per-class", type=int, default=60)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--num-items", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.num_items, args.dim, args.items_per_class, args.chunk_size)
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={args.dim}, chunk={args.chunk_size}"
    )
    runs = [("full matrix", "full", args.full_size), ("chunked", "chunked", args.full_size)]
    if args.large_size:
        runs.append(("chunked", "chunked", args.large_size))
    results = [(label, num_items, measure(method, num_items, args)) for label, method, num_items in runs]

    full = results[0][2]
    print(
        "\n| method | N | time (s) | peak extra RSS (MiB) | N x N float32 (MiB) | time/full | memory/full |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, num_items, result in results:
        same_size = num_items == args.full_size
        time_ratio = f"{result['seconds'] / full['seconds']:.2f}" if same_size else "-"
        memory_ratio = f"{result['peak_extra_bytes'] / full['peak_extra_bytes']:.3f}" if same_size else "-"
        print(
            f"| {label} | {num_items:,} | {result['seconds']:.1f} | {result['peak_extra_bytes'] / MIB:.0f} "
            f"| {num_items * num_items * 4 / MIB:,.0f} | {time_ratio} | {memory_ratio} |"
        )
    differences = {key: abs(results[1][2]["metrics"][key] - full["metrics"][key]) for key in full["metrics"]}
    print(f"\nmax |chunked - full| over the metrics at N={args.full_size:,}: {max(differences.values()):.2e}")
    print("metrics:", {key: round(value, 4) for key, value in results[-1][2]["metrics"].items()})


if __name__ == "__main__":
    main()
