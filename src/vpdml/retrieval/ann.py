"""Approximate (and exact) FAISS search backends for gallery indexes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "FaissOptions"]


BACKENDS = ("exact", "faiss", "faiss-hnsw", "faiss-ivf")
"""``search`` backends: exact chunked matmul, FAISS flat (exact), FAISS HNSW and IVF (approximate)."""
FAISS_BACKENDS = BACKENDS[1:]
IVF_MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns below this many training vectors per centroid
RECALL_TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------------
# FAISS options
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaissOptions:
    """Parameters of the approximate FAISS backends (``search(..., faiss_options=...)``).

    Build-time fields (a change builds a new FAISS index): ``hnsw_m`` (graph degree), ``hnsw_ef_construction``,
    ``ivf_nlist`` (k-means lists; default ``round(sqrt(N))``), ``ivf_train_size`` (vectors the k-means is trained
    on, a seeded random sample; default ``min(N, 64 * nlist)``) and ``seed``. Search-time fields (no rebuild):
    ``hnsw_ef_search`` (raised to ``k`` when smaller) and ``ivf_nprobe`` (lists visited per query, capped at
    ``nlist``). Larger ``hnsw_ef_search`` / ``ivf_nprobe`` buy recall with latency; measure it with
    :meth:`GalleryIndex.ann_recall`.
    """

    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    ivf_nlist: int | None = None
    ivf_nprobe: int = 16
    ivf_train_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FaissOptions.{name} must be a positive integer, got {value!r}.")
        for name in ("ivf_nlist", "ivf_train_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"FaissOptions.{name} must be a positive integer or None, got {value!r}.")

    def build_key(self, backend: str) -> tuple[Any, ...]:
        """What identifies a built FAISS index of ``backend`` (search-time fields left out)."""
        if backend == "faiss-hnsw":
            return (backend, self.hnsw_m, self.hnsw_ef_construction)
        if backend == "faiss-ivf":
            return (backend, self.ivf_nlist, self.ivf_train_size, self.seed)
        return (backend,)


def import_faiss(backend: str) -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            f"backend={backend!r} needs FAISS: `pip install vpdml[faiss]` (or `pip install faiss-cpu`), or use "
            "backend='exact'."
        ) from error
    return faiss
