"""Gallery search latency and recall of every `GalleryIndex.search` backend, on random embeddings.

For each gallery size and embedding dimension: the FAISS build time, the latency per query when 100 queries are
searched in one call (batch: median of up to 5 calls) and when one query is searched per call (single: median over
up to 20 queries), and recall@10 against exact
search. Every row calls `GalleryIndex.search` end to end (query normalisation and id lookup included), so it is
what a caller sees.

    python bench/search_latency.py --quick                 # 10k vectors, dims 512 and 384 (~1 min)
    python bench/search_latency.py                         # 10k and 1M vectors (~2 GB per 1M x 512 gallery)
    python bench/search_latency.py --sizes 100000 --dims 512 --backends exact faiss-hnsw --json out.json

Data. `--data clustered` (default) draws unit vectors around N / 100 random unit centres (classes of about 100
images, like retrieval embeddings): with the default `--noise 0.75` a vector's cosine with its centre is about
0.8, with another vector of its class about 0.64 (noise 1.5: 0.55 and 0.31). The queries are fresh draws from the same classes, not gallery vectors. `--data uniform` draws
uniform random unit vectors: every neighbour is nearly as far as any other, the worst case for approximate search.

Memory. The table's memory column is what the backend keeps besides the index's own float32 embeddings
(N x dim x 4 bytes), estimated from the FAISS structures; the exact backend keeps a unit-norm float32 copy of the
gallery, made on its first search (and again after ``add`` / ``delete``). The process's peak RSS is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import time
from collections.abc import Sequence

import torch

from vpdml.retrieval.ann import BACKENDS, FaissOptions
from vpdml.retrieval.identity import AdapterIdentity
from vpdml.retrieval.index import GalleryIndex

IDENTITY = AdapterIdentity("0" * 64, name="random")
LABELS = {
    "exact": "exact (chunked matmul)",
    "faiss": "faiss flat",
    "faiss-hnsw": "faiss HNSW",
    "faiss-ivf": "faiss IVF",
}
CLASS_SIZE = 100
NOISE = 0.75  # default per-vector noise norm relative to the unit class centre


def random_unit_vectors(
    count: int, dim: int, data: str, seed: int, centres: torch.Tensor | None = None, noise_norm: float = NOISE
):
    """``count`` unit vectors (float32), generated in blocks so a 1M gallery never exists twice."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(count, dim)
    for start in range(0, count, 65536):
        rows = min(65536, count - start)
        noise = torch.randn(rows, dim, generator=generator)
        if data == "clustered":
            assert centres is not None
            labels = torch.randint(0, centres.shape[0], (rows,), generator=generator)
            noise = centres[labels] + noise_norm * noise / math.sqrt(dim)
        out[start : start + rows] = torch.nn.functional.normalize(noise, dim=1)
    return out


def memory_mib(backend: str, index: GalleryIndex, built) -> float:
    """What the backend keeps besides the index's embeddings (estimate from the FAISS structures)."""
    count, dim = len(index), index.dim
    # exact: the unit-norm float32 gallery it caches; FAISS: its own copy of the vectors
    vectors = count * dim * 4
    if backend == "exact":
        return vectors / 2**20
    if backend == "faiss-hnsw" and hasattr(built, "hnsw"):
        vectors += built.hnsw.neighbors.size() * 4 + built.hnsw.offsets.size() * 8 + count * 5
    elif backend == "faiss-ivf" and hasattr(built, "nlist"):
        vectors += count * 8 + built.nlist * dim * 4
    return vectors / 2**20


def timed(fn, calls: Sequence, *, minimum: int, budget_s: float) -> float:
    """Median seconds of ``fn(arg)`` over ``calls`` (stopping early, after ``minimum`` calls, past ``budget_s``)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for arg in calls:
        if len(times) >= minimum and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(
    size: int, dim: int, args: argparse.Namespace, options: FaissOptions
) -> list[dict[str, float | int | str]]:
    centres = None
    if args.data == "clustered":
        generator = torch.Generator().manual_seed(10_000 + dim)
        centres = torch.nn.functional.normalize(
            torch.randn(max(1, size // CLASS_SIZE), dim, generator=generator), dim=1
        )
    gallery = random_unit_vectors(size, dim, args.data, seed=0, centres=centres, noise_norm=args.noise)
    queries = random_unit_vectors(
        args.queries, dim, args.data, seed=1, centres=centres, noise_norm=args.noise
    )
    ids = range(size)
    rows = []
    for backend in args.backends:
        index = GalleryIndex.from_embeddings(gallery, ids, adapter_identity=IDENTITY)  # shares `gallery`
        start = time.perf_counter()
        built = index.build_ann(backend, options) if backend != "exact" else None
        build_s = time.perf_counter() - start

        def search(query: torch.Tensor, index: GalleryIndex = index, backend: str = backend) -> None:
            index.search(query, args.k, adapter_identity=IDENTITY, backend=backend, faiss_options=options)

        search(queries[:1])  # warm-up
        batch_s = timed(search, [queries] * args.repeats, minimum=2, budget_s=args.budget)
        singles = [queries[i : i + 1] for i in range(min(args.single_queries, args.queries))]
        single_s = timed(search, singles, minimum=3, budget_s=args.budget)
        recall = index.ann_recall(
            queries, args.k, backend=backend, faiss_options=options, adapter_identity=IDENTITY
        )
        rows.append(
            {
                "size": size,
                "dim": dim,
                "backend": backend,
                "build_s": build_s,
                "batch_ms_per_query": 1000 * batch_s / args.queries,
                "single_ms": 1000 * single_s,
                "recall": recall,
                "memory_mib": memory_mib(backend, index, built),
            }
        )
        print(_row(rows[-1], args.queries), flush=True)
        del index, built, search  # free this backend's FAISS index before the next one is built
    return rows


HEADER = (
    "| gallery | dim | backend | build (s) | batch of {q}: ms / query | single query: ms | recall@{k} vs exact "
    "| extra memory (MiB) |\n|---:|---:|---|---:|---:|---:|---:|---:|"
)


def _row(row: dict, queries: int) -> str:
    build = "-" if row["backend"] == "exact" else f"{row['build_s']:.2f}"
    return (
        f"| {row['size']:,} | {row['dim']} | {LABELS[row['backend']]} | {build} | {row['batch_ms_per_query']:.3f} "
        f"| {row['single_ms']:.2f} | {row['recall']:.3f} | {row['memory_mib']:.0f} |"
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10k vectors only.")
    parser.add_argument("--sizes", type=int, nargs="+", help="Gallery sizes (default: 10000 1000000).")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 384], help="Embedding dims (512 384).")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument(
        "--noise",
        type=float,
        default=NOISE,
        help=f"Clustered data: noise norm around a unit centre ({NOISE}).",
    )
    parser.add_argument("--queries", type=int, default=100, help="Queries in the batch (default: 100).")
    parser.add_argument("--single-queries", type=int, default=20, help="Queries timed one per call (20).")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="Timed batch calls, median (default: 5).")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="Seconds per timing before stopping early."
    )
    parser.add_argument("--hnsw-m", type=int, default=FaissOptions.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=FaissOptions.hnsw_ef_construction)
    parser.add_argument("--ef-search", type=int, default=FaissOptions.hnsw_ef_search)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: sqrt(N)).")
    parser.add_argument("--nprobe", type=int, default=FaissOptions.ivf_nprobe)
    parser.add_argument(
        "--threads", type=int, help="Threads for torch and FAISS (default: torch's and FAISS's own defaults)."
    )
    parser.add_argument("--json", help="Also write the rows and settings as JSON here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 1_000_000])
    options = FaissOptions(
        hnsw_m=args.hnsw_m,
        hnsw_ef_construction=args.ef_construction,
        hnsw_ef_search=args.ef_search,
        ivf_nlist=args.nlist,
        ivf_nprobe=args.nprobe,
    )
    try:
        import faiss

        faiss_version = faiss.__version__
        if args.threads:
            faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss_version = None
        args.backends = [backend for backend in args.backends if backend == "exact"]
        print("faiss is not installed (pip install vpdml[faiss]): exact search only")
    print(
        f"{args.data} random unit vectors{f' (noise {args.noise})' if args.data == 'clustered' else ''}, "
        f"{args.queries} queries, k={args.k}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss_version}"
        f"{f' ({faiss.omp_get_max_threads()} threads)' if faiss_version else ''}, {options}\n"
    )
    print(HEADER.format(q=args.queries, k=args.k), flush=True)
    rows = [row for size in sizes for dim in args.dims for row in bench_one(size, dim, args, options)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the process: {peak:.0f} MiB")
    if args.json:
        settings = {key: value for key, value in vars(args).items() if key != "json"}
        record = {
            "settings": settings,
            "faiss_options": options.__dict__,
            "faiss": faiss_version,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "peak_rss_mib": peak,
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
