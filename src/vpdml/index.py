"""A gallery index: embed a folder of images (or a ``datasets.Dataset``) once, then search it with new images.

::

    from vpdml.index import GalleryIndex, embed_queries

    index = GalleryIndex.build(model, "photos/", transform, batch_size=64)   # ids: paths relative to photos/
    index.save("photos.index")                                              # safetensors + JSON, atomic
    index = GalleryIndex.load("photos.index")
    queries = embed_queries(model, [Image.open("q.jpg")], transform)       # embeddings + adapter identity
    scores, ids = index.search(queries, k=10)                               # exact cosine top-k

Embeddings only compare when they come from the same adapter. The index records the adapter's
:class:`AdapterIdentity` (a SHA-256 of its weights and config, plus its name, Hub revision and backbone when
known) and :meth:`GalleryIndex.search` refuses queries that carry another one. Search is exact (chunked matrix
products, :func:`vpdml.metrics.nearest_neighbors`); ``backend="faiss"`` uses a FAISS flat inner-product index
instead when ``faiss`` is installed (``pip install faiss-cpu``).

On disk an index is a folder: ``index.json`` (format, ids, per-item metadata, adapter identity, the name and
SHA-256 of the embeddings file, and a SHA-256 of the record itself) and ``embeddings-<digest>.safetensors``. The embeddings file is written first
under a new name and ``index.json`` is then replaced atomically, so a reader sees the old index or the new one,
never a mix; :meth:`GalleryIndex.load` checks the digest, so a truncated or edited file is refused. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic_io import atomic_write_bytes
from .metrics import nearest_neighbors

__all__ = [
    "INDEX_FILE",
    "AdapterIdentity",
    "AdapterMismatchError",
    "GalleryIndex",
    "QueryEmbeddings",
    "embed_queries",
]

INDEX_FILE = "index.json"
INDEX_FORMAT = "vpdml-gallery-index/1"
# Config fields that do not change what the adapter computes (where it was loaded from, PEFT bookkeeping).
_VOLATILE_CONFIG_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "task_type"}
)


class AdapterMismatchError(ValueError):
    """Query embeddings come from another adapter than the index's: their similarities mean nothing."""


# --------------------------------------------------------------------------------------------------
# Adapter identity
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterIdentity:
    """Which adapter made some embeddings.

    ``sha256`` decides: it is a digest of the adapter's tensors (what ``adapter_model.safetensors`` holds) and of
    its config (``adapter_config.json`` without the fields that only say where it was loaded from). The same
    adapter gives the same digest whether it is in memory, in a folder, or downloaded from the Hub. ``name``
    (folder, Hub repo id or PEFT adapter name), ``revision`` (Hub commit) and ``backbone`` are for people.
    """

    sha256: str
    name: str | None = None
    revision: str | None = None
    backbone: str | None = None

    @classmethod
    def of_model(
        cls,
        model: nn.Module,
        adapter_name: str | None = None,
        *,
        name: str | None = None,
        revision: str | None = None,
        backbone: str | None = None,
    ) -> AdapterIdentity:
        """Identity of a PEFT model's adapter (default: the active one) or of a :class:`vpdml.FullFineTuningDML`."""
        from peft import PeftModel, get_peft_model_state_dict

        if isinstance(model, PeftModel):
            adapter = adapter_name or model.active_adapter
            if adapter not in model.peft_config:
                raise ValueError(f"Unknown adapter {adapter!r} (adapters: {sorted(model.peft_config)}).")
            tensors = get_peft_model_state_dict(model, adapter_name=adapter)
            config = model.peft_config[adapter].to_dict()
            backbone = backbone or config.get("base_model_name_or_path")
            name = name or adapter
            revision = revision or config.get("revision")
        else:
            from .full_finetune import FullFineTuningDML

            if not isinstance(model, FullFineTuningDML):
                raise TypeError(
                    f"Expected a PeftModel with a vpdml adapter or a vpdml.FullFineTuningDML, got {type(model).__name__}."
                )
            tensors = model.state_dict()
            config = dict(model.settings)
        return cls(_digest(tensors, config), name=name, revision=revision, backbone=backbone)

    @classmethod
    def of_adapter_dir(
        cls,
        directory: str | os.PathLike,
        *,
        name: str | None = None,
        revision: str | None = None,
        backbone: str | None = None,
    ) -> AdapterIdentity:
        """Identity of a saved adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
        for path in (weights, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{directory} holds no {path.name}: not a saved (safetensors) adapter."
                )
        config = json.loads(config_path.read_text())
        return cls(
            _digest(load_file(str(weights)), config),
            name=name or str(directory),
            revision=revision,
            backbone=backbone or config.get("base_model_name_or_path"),
        )

    def describe(self) -> str:
        parts = [self.name or "unnamed adapter"]
        if self.revision:
            parts.append(f"revision {self.revision}")
        parts.append(f"sha256 {self.sha256[:12]}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterIdentity:
        sha = values.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ValueError(f"adapter identity without a valid sha256: {dict(values)!r}")
        return cls(sha, values.get("name"), values.get("revision"), values.get("backbone"))


def _digest(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """SHA-256 over the tensors (sorted by key: name, dtype, shape, bytes) and the canonical JSON config."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    stable = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(stable, sort_keys=True, default=str).encode())
    return digest.hexdigest()


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
        from .cli import image_folder_dataset

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
    from .evaluation import embed_dataset

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
        self._faiss: Any = None

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
        self._faiss = None

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
        self._faiss = None

    # search ---------------------------------------------------------------------------------------

    def search(
        self,
        queries: QueryEmbeddings | torch.Tensor,
        k: int = 10,
        *,
        adapter_identity: AdapterIdentity | None = None,
        backend: str = "exact",
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, list[list[str]]]:
        """The ``k`` most similar gallery items of each query: ``(scores (Q, k), ids)``, best first.

        ``queries`` is a :class:`QueryEmbeddings` (from :func:`embed_queries`) or a ``(Q, E)`` tensor with its
        ``adapter_identity``; a query from another adapter raises :class:`AdapterMismatchError`. ``k`` is capped
        at the index size. Scores are cosine similarities. ``backend``: ``"exact"`` (chunked matmul) or
        ``"faiss"`` (a flat inner-product FAISS index; needs ``pip install faiss-cpu``).
        """
        query = self._checked_queries(queries, adapter_identity, required=True)
        if not len(self):
            raise ValueError("The index is empty.")
        k = min(int(k), len(self))
        if backend == "exact":
            scores, rows = nearest_neighbors(query, self.embeddings, k, chunk_size=chunk_size, device=device)
        elif backend == "faiss":
            scores, rows = self._faiss_search(query, k)
        else:
            raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}.")
        return scores, [[self.ids[row] for row in line] for line in rows.tolist()]

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

    def _faiss_search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            import faiss
        except ImportError as error:
            raise ImportError(
                "backend='faiss' needs FAISS: `pip install faiss-cpu` (or faiss-gpu), or use backend='exact'."
            ) from error
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(torch.nn.functional.normalize(self.embeddings, dim=1).numpy())
        scores, rows = self._faiss.search(torch.nn.functional.normalize(query, dim=1).numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()

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
