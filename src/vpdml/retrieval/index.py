"""A gallery index: embed a folder of images (or a ``datasets.Dataset``) once, then search it with new images.

::

    from vpdml.retrieval.index import GalleryIndex, embed_queries

    index = GalleryIndex.build(model, "photos/", transform, batch_size=64)   # ids: paths relative to photos/
    index.save("photos.index")                                              # safetensors + JSON, atomic
    index = GalleryIndex.load("photos.index")
    queries = embed_queries(model, [Image.open("q.jpg")], transform)       # embeddings + adapter identity
    scores, ids = index.search(queries, k=10)                               # exact cosine top-k
    scores, ids = index.search(queries, k=10, backend="faiss-hnsw")         # approximate (FAISS HNSW)
    index.ann_recall(queries, k=10, backend="faiss-hnsw")                   # its recall@10 vs exact search

Embeddings only compare when they come from the same adapter. The index records the adapter's
:class:`AdapterIdentity` (a SHA-256 of its weights and config, plus its name, Hub revision and backbone when
known) and :meth:`GalleryIndex.search` refuses queries that carry another one. Search is exact by default (chunked
matrix products, :func:`vpdml.retrieval.knn.nearest_neighbors`). With ``faiss`` installed (``pip install vpdml[faiss]``)
``backend="faiss"`` uses a FAISS flat inner-product index (exact too), and ``"faiss-hnsw"`` (``IndexHNSWFlat``) or
``"faiss-ivf"`` (``IndexIVFFlat``) an approximate one, tuned by :class:`FaissOptions`;
:meth:`GalleryIndex.ann_recall` measures an approximate backend's recall@k against exact search. FAISS indexes
live in memory only: built on first use (or by :meth:`GalleryIndex.build_ann`), dropped by ``add`` / ``delete``.

On disk an index is a folder: ``index.json`` (format, ids, per-item metadata, adapter identity, the name and
SHA-256 of the embeddings file, and a SHA-256 of the record itself) and ``embeddings-<digest>.safetensors``. The embeddings file is written first
under a new name and ``index.json`` is then replaced atomically, so a reader sees the old index or the new one,
never a mix; :meth:`GalleryIndex.load` checks the digest, so a truncated or edited file is refused. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpdml.atomic_io import atomic_write_bytes
from vpdml.data.folders import image_folder_dataset
from vpdml.retrieval.ann import (
    BACKENDS,
    FAISS_BACKENDS,
    IVF_MIN_POINTS_PER_LIST,
    RECALL_TOLERANCE,
    FaissOptions,
    import_faiss,
)
from vpdml.retrieval.embed import embed_dataset
from vpdml.retrieval.identity import AdapterIdentity, AdapterMismatchError
from vpdml.retrieval.knn import nearest_neighbors, unit_gallery

__all__ = ["INDEX_FILE", "GalleryIndex", "QueryEmbeddings", "embed_queries"]

INDEX_FILE = "index.json"
INDEX_FORMAT = "vpdml-gallery-index/1"


# --------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------


@dataclass
class QueryEmbeddings:
    """Query embeddings ``(Q, E)`` and the identity of the adapter that made them."""

    embeddings: torch.Tensor
    adapter_identity: AdapterIdentity


def _as_dataset(images: Any) -> tuple[Any, list[str], dict[str, Any]]:
    """``(datasets.Dataset with image + label, default ids, index-level info)`` from a folder or a Dataset."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of images.")
        dataset, paths = image_folder_dataset(folder)
        return dataset, paths, {"image_root": str(folder.resolve())}
    if isinstance(images, Dataset):
        if "image" not in images.column_names:
            raise KeyError(f"The dataset has no 'image' column (columns: {images.column_names}).")
        dataset = images.select_columns(["image"])
        dataset = dataset.add_column("label", [-1] * dataset.num_rows)
        return dataset, [str(i) for i in range(dataset.num_rows)], {}
    if isinstance(images, Sequence):  # PIL images
        features = Features({"image": ImageFeature(), "label": Value("int64")})
        dataset = Dataset.from_dict({"image": list(images), "label": [-1] * len(images)}, features=features)
        return dataset, [str(i) for i in range(len(images))], {}
    raise TypeError(
        f"images must be a folder, a datasets.Dataset or a list of PIL images, got {type(images)}."
    )


def _embed(
    model: nn.Module, dataset: Any, transform: Callable[..., torch.Tensor], batch_size: int
) -> torch.Tensor:

    embeddings, _ = embed_dataset(model, dataset, transform, batch_size=batch_size, show_progress=False)
    return embeddings


def embed_queries(
    model: nn.Module,
    images: Any,
    transform: Callable[..., torch.Tensor],
    *,
    batch_size: int = 128,
    adapter_identity: AdapterIdentity | None = None,
) -> QueryEmbeddings:
    """Embed query images (a folder, a ``datasets.Dataset`` or a list of PIL images) with their adapter identity."""
    dataset, _, _ = _as_dataset(images)
    identity = adapter_identity or AdapterIdentity.of_model(model)
    return QueryEmbeddings(_embed(model, dataset, transform, batch_size), identity)


# --------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------


@dataclass
class GalleryIndex:
    """Gallery embeddings ``(N, E)`` with string ids, per-item metadata and the adapter identity.

    Build it with :meth:`build` (embeds images) or :meth:`from_embeddings`; grow and shrink it with :meth:`add`
    and :meth:`delete` (no re-embedding); query it with :meth:`search`; persist it with :meth:`save` /
    :meth:`load`.
    """

    embeddings: torch.Tensor
    ids: list[str]
    adapter_identity: AdapterIdentity
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    """Index-level facts (``image_root``, ``image_size``...) kept in ``index.json``."""

    def __post_init__(self) -> None:
        self.embeddings = _check_embeddings(self.embeddings)
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != self.embeddings.shape[0]:
            raise ValueError(f"{len(self.ids)} ids for {self.embeddings.shape[0]} embeddings.")
        duplicates = _duplicates(self.ids)
        if duplicates:
            raise ValueError(f"Duplicate ids: {duplicates[:5]}")
        self._positions = {item: row for row, item in enumerate(self.ids)}
        self._faiss: dict[tuple[Any, ...], Any] = {}  # FaissOptions.build_key -> built FAISS index
        self._unit: dict[str, torch.Tensor] = {}  # device -> normalised gallery for exact search (built once)

    # construction ---------------------------------------------------------------------------------

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        ids: Sequence[Any],
        metadata: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
        *,
        adapter_identity: AdapterIdentity,
        info: Mapping[str, Any] | None = None,
    ) -> GalleryIndex:
        """An index of precomputed embeddings (L2-normalised or not: search uses cosine similarity).

        ``metadata``: one JSON-serialisable dict per row (or a mapping id -> dict), e.g. ``{"path": ...}``.
        """
        ids = [str(i) for i in ids]
        return cls(embeddings, ids, adapter_identity, _metadata_by_id(ids, metadata), dict(info or {}))

    @classmethod
    def build(
        cls,
        model: nn.Module,
        images: Any,
        transform: Callable[..., torch.Tensor],
        *,
        batch_size: int = 128,
        ids: Sequence[Any] | None = None,
        adapter_identity: AdapterIdentity | None = None,
    ) -> GalleryIndex:
        """Embed ``images`` (a folder, searched recursively, or a ``datasets.Dataset`` with an ``image`` column).

        Ids default to the image paths relative to the folder (row numbers for a dataset); for a folder each
        item's metadata holds its ``path``. The identity defaults to :meth:`AdapterIdentity.of_model`.
        """
        dataset, default_ids, info = _as_dataset(images)
        ids = [str(i) for i in ids] if ids is not None else default_ids
        if len(ids) != len(dataset):
            raise ValueError(f"{len(ids)} ids for {len(dataset)} images.")
        metadata = None
        if "image_root" in info:
            metadata = [{"path": str(Path(info["image_root"]) / path)} for path in default_ids]
        identity = adapter_identity or AdapterIdentity.of_model(model)
        embeddings = _embed(model, dataset, transform, batch_size)
        return cls.from_embeddings(embeddings, ids, metadata, adapter_identity=identity, info=info)

    # editing --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def add(
        self,
        embeddings: torch.Tensor | QueryEmbeddings,
        ids: Sequence[Any],
        metadata: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
        *,
        adapter_identity: AdapterIdentity | None = None,
    ) -> None:
        """Append rows. Embeddings must come from the index's adapter (pass a :class:`QueryEmbeddings` or the
        ``adapter_identity``; without either they are taken on trust) and ids must be new."""
        embeddings = self._checked_queries(embeddings, adapter_identity, required=False)
        ids = [str(i) for i in ids]
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} ids for {embeddings.shape[0]} embeddings.")
        taken = sorted({*(_duplicates(ids)), *(i for i in ids if i in self._positions)})
        if taken:
            raise ValueError(f"Ids already in the index (delete them first): {taken[:5]}")
        self.embeddings = torch.cat([self.embeddings, embeddings])
        for item in ids:
            self._positions[item] = len(self.ids)
            self.ids.append(item)
        self.metadata.update(_metadata_by_id(ids, metadata))
        self._faiss.clear()
        self._unit.clear()

    def delete(self, ids: Sequence[Any]) -> None:
        """Remove rows by id (raises ``KeyError`` naming unknown ids, and then removes nothing)."""
        ids = {str(i) for i in ids}
        unknown = sorted(i for i in ids if i not in self._positions)
        if unknown:
            raise KeyError(f"Ids not in the index: {unknown[:5]}")
        keep = torch.ones(len(self.ids), dtype=torch.bool)
        keep[[self._positions[i] for i in ids]] = False
        self.embeddings = self.embeddings[keep]
        self.ids = [item for item in self.ids if item not in ids]
        self._positions = {item: row for row, item in enumerate(self.ids)}
        for item in ids:
            self.metadata.pop(item, None)
        self._faiss.clear()
        self._unit.clear()

    # search ---------------------------------------------------------------------------------------

    def search(
        self,
        queries: QueryEmbeddings | torch.Tensor,
        k: int = 10,
        *,
        adapter_identity: AdapterIdentity | None = None,
        backend: str = "exact",
        faiss_options: FaissOptions | None = None,
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, list[list[str]]]:
        """The ``k`` most similar gallery items of each query: ``(scores (Q, k), ids)``, best first.

        ``queries`` is a :class:`QueryEmbeddings` (from :func:`embed_queries`) or a ``(Q, E)`` tensor with its
        ``adapter_identity``; a query from another adapter raises :class:`AdapterMismatchError`. ``k`` is capped
        at the index size. Scores are cosine similarities. ``backend`` (see :data:`BACKENDS`): ``"exact"``
        (chunked matmul; ``chunk_size`` and ``device`` apply to it), ``"faiss"`` (a flat inner-product FAISS
        index: exact too), or the approximate ``"faiss-hnsw"`` and ``"faiss-ivf"`` (tuned by ``faiss_options``).
        The FAISS backends need ``pip install vpdml[faiss]``. An approximate backend can find fewer than ``k``
        items for a query (IVF lists too small, HNSW graph cut off): that query's id list is then shorter and its
        missing scores are ``-inf``.
        """
        query = self._checked_queries(queries, adapter_identity, required=True)
        k = self._capped_k(k)
        scores, rows = self._search_rows(query, k, backend, faiss_options, chunk_size, device)
        return scores, [[self.ids[row] for row in line if row >= 0] for line in rows.tolist()]

    def ann_recall(
        self,
        queries: QueryEmbeddings | torch.Tensor,
        k: int = 10,
        *,
        backend: str = "faiss-hnsw",
        faiss_options: FaissOptions | None = None,
        adapter_identity: AdapterIdentity | None = None,
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
    ) -> float:
        """Recall@k of ``backend`` against exact search on these queries, in [0, 1].

        The mean over queries of the fraction of the exact top ``k`` that ``backend`` returns. Ties count as found,
        as in ann-benchmarks: a returned item is a hit when its exact cosine score is at least the exact ``k``-th
        score (minus 1e-5), so duplicate gallery vectors do not lower the recall of an exact backend, which is 1.0.
        """
        query = self._checked_queries(queries, adapter_identity, required=True)
        k = self._capped_k(k)
        exact, _ = self._search_rows(query, k, "exact", None, chunk_size, device)
        _, rows = self._search_rows(query, k, backend, faiss_options, chunk_size, device)
        found = 0
        for start in range(0, query.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            returned = rows[chunk]
            valid = returned >= 0
            gallery = torch.nn.functional.normalize(self.embeddings[returned.clamp(min=0)].double(), dim=-1)
            unit = torch.nn.functional.normalize(query[chunk].double(), dim=-1)
            scores = torch.einsum("qke,qe->qk", gallery, unit)
            hits = valid & (scores >= exact[chunk, -1:].double() - RECALL_TOLERANCE)
            found += int(hits.sum())
        return found / (query.shape[0] * k)

    def build_ann(self, backend: str = "faiss-hnsw", faiss_options: FaissOptions | None = None) -> Any:
        """Build (or return the cached) FAISS index of ``backend`` for the current rows; ``search`` calls it.

        Useful to pay the build time up front. FAISS row ``i`` is index row ``i``; ``add`` and ``delete``
        drop every cached FAISS index, so rows and ids never go out of step. Returns the ``faiss.Index``.
        """
        if backend not in FAISS_BACKENDS:
            raise ValueError(f"build_ann builds a FAISS backend {FAISS_BACKENDS}, got {backend!r}.")
        faiss = import_faiss(backend)
        options = faiss_options or FaissOptions()
        key = options.build_key(backend)
        if key in self._faiss:
            return self._faiss[key]
        if not len(self):
            raise ValueError("The index is empty.")
        vectors = torch.nn.functional.normalize(self.embeddings, dim=1).numpy()
        if backend == "faiss-hnsw":
            built = faiss.IndexHNSWFlat(self.dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            built.hnsw.efConstruction = options.hnsw_ef_construction
        elif backend == "faiss-ivf":
            built = self._ivf(faiss, vectors, options)
        else:
            built = faiss.IndexFlatIP(self.dim)
        built.add(vectors)
        self._faiss[key] = built
        return built

    def _ivf(self, faiss: Any, vectors: Any, options: FaissOptions) -> Any:
        count = len(self)
        nlist = options.ivf_nlist or max(1, round(math.sqrt(count)))
        if count < IVF_MIN_POINTS_PER_LIST * nlist:
            if options.ivf_nlist is not None:
                raise ValueError(
                    f"faiss-ivf with ivf_nlist={nlist} needs at least {IVF_MIN_POINTS_PER_LIST * nlist} vectors to "
                    f"train its k-means, the index has {count}: lower ivf_nlist or use backend='faiss'."
                )
            warnings.warn(
                f"The index has {count} vectors, too few to train a faiss-ivf index (at least "
                f"{IVF_MIN_POINTS_PER_LIST} per list, {nlist} lists): using an exact flat FAISS index instead.",
                UserWarning,
                stacklevel=2,
            )
            return faiss.IndexFlatIP(self.dim)
        quantizer = faiss.IndexFlatIP(self.dim)  # faiss's wrapper keeps a reference to it in the IVF index
        built = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        built.cp.seed = options.seed
        train_size = min(count, options.ivf_train_size or 64 * nlist)
        if train_size < IVF_MIN_POINTS_PER_LIST * nlist:
            raise ValueError(
                f"ivf_train_size={train_size} is below {IVF_MIN_POINTS_PER_LIST} vectors per list ({nlist} lists)."
            )
        sample = torch.randperm(count, generator=torch.Generator().manual_seed(options.seed))[:train_size]
        built.train(vectors[sample.sort().values.numpy()])
        return built

    def _capped_k(self, k: int) -> int:
        if not len(self):
            raise ValueError("The index is empty.")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        return min(int(k), len(self))

    def _unit_gallery(self, device: torch.device | str | None) -> torch.Tensor:
        # normalising the gallery is a full pass over it: do it once per device, not once per query
        key = str(device)
        if key not in self._unit:
            self._unit[key] = unit_gallery(self.embeddings, device)
        return self._unit[key]

    def _search_rows(
        self,
        query: torch.Tensor,
        k: int,
        backend: str,
        faiss_options: FaissOptions | None,
        chunk_size: int,
        device: torch.device | str | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, rows)`` of the top ``k``; a row of -1 (score -inf) marks an item FAISS did not find."""
        if backend == "exact":
            return nearest_neighbors(
                query,
                self._unit_gallery(device),
                k,
                chunk_size=chunk_size,
                device=device,
                gallery_is_unit=True,
            )
        if backend not in FAISS_BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        faiss = import_faiss(backend)
        options = faiss_options or FaissOptions()
        built = self.build_ann(backend, options)
        # Search-time settings go on the index object, not through `search(params=...)`: importing
        # pytorch-metric-learning (or anything else that imports faiss.contrib.torch_utils) replaces
        # `Index.search` by a wrapper that takes no `params`.
        if isinstance(built, faiss.IndexHNSW):
            built.hnsw.efSearch = max(options.hnsw_ef_search, k)
        elif isinstance(built, faiss.IndexIVF):
            built.nprobe = min(options.ivf_nprobe, built.nlist)
        unit = torch.nn.functional.normalize(query, dim=1).numpy()
        scores, rows = built.search(unit, k)
        scores, rows = torch.from_numpy(scores), torch.from_numpy(rows).long()
        return scores.masked_fill(rows < 0, float("-inf")), rows

    def _checked_queries(
        self, queries: QueryEmbeddings | torch.Tensor, identity: AdapterIdentity | None, *, required: bool
    ) -> torch.Tensor:
        if isinstance(queries, QueryEmbeddings):
            if identity is not None and identity.sha256 != queries.adapter_identity.sha256:
                raise ValueError("adapter_identity differs from the one the QueryEmbeddings carry.")
            identity, queries = queries.adapter_identity, queries.embeddings
        if identity is None and required:
            raise ValueError(
                "Pass the query's adapter identity: index.search(QueryEmbeddings(...), k) or "
                "index.search(tensor, k, adapter_identity=AdapterIdentity.of_model(model)); embeddings of another "
                "adapter cannot be compared with this index's."
            )
        if identity is not None and identity.sha256 != self.adapter_identity.sha256:
            raise AdapterMismatchError(
                f"The queries were embedded with another adapter ({identity.describe()}) than this index "
                f"({self.adapter_identity.describe()}): their similarities would be meaningless. Embed the queries "
                "with the index's adapter, or rebuild the index with this one."
            )
        queries = _check_embeddings(queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"Queries have {queries.shape[1]} dimensions, the index {self.dim}.")
        return queries

    # persistence ----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.json`` and ``embeddings-<digest>.safetensors`` into ``directory`` (see the module doc)."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blob = save({"embeddings": self.embeddings.contiguous()}, metadata={"format": INDEX_FORMAT})
        sha = hashlib.sha256(blob).hexdigest()
        name = f"embeddings-{sha[:16]}.safetensors"
        atomic_write_bytes(directory / name, blob)
        record = {
            "format": INDEX_FORMAT,
            "embeddings_file": name,
            "embeddings_sha256": sha,
            "count": len(self),
            "dim": self.dim,
            "adapter": self.adapter_identity.to_dict(),
            "info": self.info,
            "ids": self.ids,
            "metadata": {item: self.metadata[item] for item in self.ids if item in self.metadata},
        }
        record["record_sha256"] = _record_digest(record)
        atomic_write_bytes(directory / INDEX_FILE, json.dumps(record, indent=1).encode())
        for stale in directory.glob("embeddings-*.safetensors"):  # files of earlier saves
            if stale.name != name:
                stale.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GalleryIndex:
        """Read an index folder written by :meth:`save`; a truncated or edited file raises ``ValueError``."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        directory = Path(directory)
        record_path = directory / INDEX_FILE
        if not record_path.is_file():
            raise FileNotFoundError(f"{directory} is not a vpdml index: it has no {INDEX_FILE}.")
        try:
            record = json.loads(record_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{record_path} is not valid JSON (truncated or edited?): {error}") from error
        if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
            raise ValueError(f"{record_path} is not a {INDEX_FORMAT} index file.")
        recorded = record.pop("record_sha256", None)
        if recorded is None:
            raise ValueError(
                f"{record_path} has no record_sha256: not written by GalleryIndex.save (rebuild it)."
            )
        if recorded != _record_digest(record):
            raise ValueError(
                f"{record_path} does not match its recorded SHA-256: it was edited. Rebuild the index "
                "(vpdml index build) rather than editing it; use add() / delete() to change its contents."
            )
        try:
            name, sha = str(record["embeddings_file"]), str(record["embeddings_sha256"])
            ids, count, dim = list(record["ids"]), int(record["count"]), int(record["dim"])
            identity = AdapterIdentity.from_dict(record["adapter"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{record_path} is incomplete or edited: {error!r}") from error
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise FileNotFoundError(f"{record_path} names {name!r}, which is not in {directory}.")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise ValueError(
                f"{path} does not match the SHA-256 recorded in {INDEX_FILE}: the file is truncated or was edited. "
                "Rebuild the index (vpdml index build)."
            )
        try:
            embeddings = load(blob)["embeddings"]
        except (SafetensorError, KeyError, ValueError) as error:
            raise ValueError(f"{path} is not a readable embeddings file: {error}") from error
        if tuple(embeddings.shape) != (count, dim) or len(ids) != count:
            raise ValueError(
                f"{directory}: {len(ids)} ids, embeddings {tuple(embeddings.shape)}, expected ({count}, {dim})."
            )
        return cls(
            embeddings, ids, identity, dict(record.get("metadata") or {}), dict(record.get("info") or {})
        )


def _check_embeddings(embeddings: Any) -> torch.Tensor:
    embeddings = torch.as_tensor(embeddings).detach().float().cpu()
    if embeddings.ndim != 2:
        raise ValueError(f"Embeddings must be a 2-D (N, E) matrix, got shape {tuple(embeddings.shape)}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("Embeddings contain NaN or infinite values.")
    return embeddings


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({i for i in ids if i in seen or seen.add(i)})


def _metadata_by_id(
    ids: Sequence[str], metadata: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        wanted = set(ids)
        return {str(key): dict(value) for key, value in metadata.items() if str(key) in wanted}
    if len(metadata) != len(ids):
        raise ValueError(f"{len(metadata)} metadata entries for {len(ids)} ids.")
    return {item: dict(value) for item, value in zip(ids, metadata, strict=True)}


def _record_digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
