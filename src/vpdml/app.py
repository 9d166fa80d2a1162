"""A Gradio demo app: choose an adapter, upload or pick a query image, see its top-k gallery images with scores.

::

    pip install "vpdml[app]"
    vpdml app --index emoji=emoji.index --index products=products.index

    from vpdml.app import build_app, launch_app
    launch_app({"emoji": "emoji.index"})                 # serves http://127.0.0.1:7860 until interrupted
    demo = build_app({"emoji": GalleryIndex.load("emoji.index")})  # a gr.Blocks, to launch or mount yourself

Each entry is one gallery index (:class:`vpdml.retrieval.index.GalleryIndex`, written by `vpdml index build`); the index
records the adapter it was built with, the backbone and the crop size, and the app reloads that adapter the way
`vpdml search` does (:meth:`vpdml.ImageEmbedder.for_index`). Models load lazily, on the first search with an index,
and stay cached; adapters whose indexes name the same backbone share one copy of it (PEFT ``load_adapter``, then
``embed(adapter_name=...)``). A query is refused, as by `vpdml search`, when the adapter no longer matches the
one the index recorded.

:func:`search_image` is the whole search, separate from the UI: ``(index, QueryModel, image, k) -> [Hit]``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vpdml.data.folders import open_query_image
from vpdml.models.protocol import as_dml_model
from vpdml.retrieval.embedder import ImageEmbedder
from vpdml.retrieval.identity import AdapterIdentity
from vpdml.retrieval.index import GalleryIndex, QueryEmbeddings
from vpdml.retrieval.pretrained import index_source

__all__ = [
    "AdapterCache",
    "Hit",
    "QueryModel",
    "build_app",
    "example_items",
    "image_folders",
    "launch_app",
    "load_indexes",
    "search_image",
]

DEFAULT_K = 5
MAX_K = 50
NUM_EXAMPLES = 8
INSTALL_HINT = "The demo app needs Gradio: pip install 'vpdml[app]' (or pip install 'gradio>=4,<7')."
_PLACEHOLDER_SIZE = 64


# --------------------------------------------------------------------------------------------------
# Search, without any UI
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = best), cosine score, index id and image file (``None`` when unknown)."""

    rank: int
    score: float
    id: str
    path: str | None

    @property
    def caption(self) -> str:
        """What the app shows under the image: ``#1 · 0.9871 · class_03/2.png``."""
        return f"#{self.rank} · {self.score:.4f} · {self.id}"


@dataclass
class QueryModel:
    """What embeds queries for one index: the model, its eval transform and the adapter's identity.

    ``adapter_name`` is the PEFT adapter to embed with (several adapters can live on one model); ``None`` for a
    :class:`vpdml.FullFineTuningDML` or to use the model's active adapter.
    """

    model: Any
    transform: Callable[..., torch.Tensor]
    identity: AdapterIdentity
    adapter_name: str | None = None

    def embed(self, images: Sequence[Any]) -> QueryEmbeddings:
        """L2-normalised embeddings of PIL images, tagged with the adapter identity (for ``index.search``)."""
        pixels = torch.stack([self.transform(image) for image in images])
        pixels = pixels.to(next(self.model.parameters()).device)
        with torch.no_grad():
            if self.adapter_name is None:
                embeddings = self.model.embed(pixels)
            else:
                embeddings = self.model.embed(pixels, adapter_name=self.adapter_name)
        return QueryEmbeddings(embeddings.float().cpu(), self.identity)


def _open_image(image: Any) -> Any:
    """A PIL image from a PIL image, an image file path or an ``(H, W[, C])`` uint8 array."""
    from PIL import Image

    if image is None or (isinstance(image, str) and not image):
        raise ValueError("No query image: upload one or pick one of the examples.")
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"No such query image: {path}")
        return open_query_image(path)
    if hasattr(image, "__array__"):
        import numpy as np

        return Image.fromarray(np.asarray(image))
    raise TypeError(f"Expected a PIL image, a file path or an array, got {type(image).__name__}.")


def _image_path(index: GalleryIndex, item: str) -> str | None:
    path = index.metadata.get(item, {}).get("path")
    return str(path) if path and Path(path).is_file() else None


def search_image(index: GalleryIndex, query_model: QueryModel, image: Any, k: int = DEFAULT_K) -> list[Hit]:
    """The ``k`` gallery items of ``index`` most similar to ``image``, best first.

    ``image``: a PIL image, an image file path or an array. Raises ``ValueError`` without an image or for
    ``k < 1``, and :class:`vpdml.retrieval.index.AdapterMismatchError` when ``query_model`` is not the index's adapter.
    """
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    queries = query_model.embed([_open_image(image)])
    scores, ids = index.search(queries, int(k))
    return [
        Hit(rank, float(score), item, _image_path(index, item))
        for rank, (score, item) in enumerate(zip(scores[0].tolist(), ids[0], strict=True), start=1)
    ]


def example_items(index: GalleryIndex, count: int = NUM_EXAMPLES) -> list[tuple[str, str]]:
    """Up to ``count`` ``(image path, id)`` pairs spread evenly over the index (items with an image file)."""
    items = [(path, item) for item in index.ids if (path := _image_path(index, item))]
    if count <= 0 or not items:
        return []
    if len(items) <= count:
        return items
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


# --------------------------------------------------------------------------------------------------
# Loading: indexes eagerly, models lazily and once
# --------------------------------------------------------------------------------------------------


def load_indexes(indexes: Mapping[str, GalleryIndex | str | os.PathLike]) -> dict[str, GalleryIndex]:
    """``{name: GalleryIndex}``, loading the entries given as index folders."""
    if not indexes:
        raise ValueError("Give at least one index: {name: GalleryIndex or index folder}.")
    loaded = {}
    for name, index in indexes.items():
        if not str(name).strip():
            raise ValueError("Index names must not be empty.")
        loaded[str(name)] = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index)
    return loaded


class AdapterCache:
    """Loads the adapter of each index once, on first use; adapters on the same backbone share one model.

    Indexes that record the same backbone (``index.info["backbone"]``) get their adapters loaded into one
    :class:`~vpdml.retrieval.embedder.ImageEmbedder` (PEFT ``load_adapter``, one adapter name per index); an index
    built with the same adapter (same SHA-256), backbone and crop size as one already loaded reuses it. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, QueryModel] = {}
        self._by_key: dict[tuple[Any, ...], QueryModel] = {}
        self._embedders: dict[str, ImageEmbedder] = {}

    def get(self, name: str, index: GalleryIndex) -> QueryModel:
        """The :class:`QueryModel` of index ``name`` (loaded now if it is the first call)."""

        with self._lock:
            if name in self._models:
                return self._models[name]
            backbone = index.info.get("backbone")
            key = (backbone, index.adapter_identity.sha256, index.info.get("image_size"))
            if backbone and key in self._by_key:
                self._models[name] = self._by_key[key]
                return self._models[name]
            embedder = self._embedders.get(backbone) if backbone else None
            adapter_name = self._adapter_name(name, embedder.adapters if embedder is not None else ())
            where = f"index {name!r}"
            if embedder is None:
                embedder = ImageEmbedder.for_index(index, where=where, adapter_name=adapter_name)
                if backbone and as_dml_model(embedder.model).is_adapter:
                    self._embedders[backbone] = embedder
            else:
                adapter, _, image_size = index_source(index, where=where)
                embedder.add_adapter(adapter_name, adapter, image_size=image_size)
            is_peft = as_dml_model(embedder.model).is_adapter
            query_model = QueryModel(
                embedder.model,
                embedder.transform(adapter_name),
                embedder.identity(adapter_name),
                adapter_name if is_peft else None,
            )
            self._models[name] = query_model
            if backbone:
                self._by_key[key] = query_model
            return query_model

    @property
    def backbones(self) -> dict[str, Any]:
        """``{backbone name: shared PeftModel}`` loaded so far."""
        return {backbone: embedder.model for backbone, embedder in self._embedders.items()}

    @staticmethod
    def _adapter_name(name: str, taken: Sequence[str]) -> str:
        """A PEFT adapter name (no dots, as module keys) for index ``name``, not in ``taken``."""
        base = re.sub(r"\W", "_", name) or "adapter"
        candidate, number = base, 2
        while candidate in taken:
            candidate, number = f"{base}_{number}", number + 1
        return candidate


def image_folders(indexes: Mapping[str, GalleryIndex]) -> list[str]:
    """The folders holding the indexes' image files: the app may serve files from these (``allowed_paths``)."""
    folders: set[str] = set()
    for index in indexes.values():
        root = index.info.get("image_root")
        if root and Path(root).is_dir():
            folders.add(str(Path(root).resolve()))
        for values in index.metadata.values():
            path = values.get("path")
            if path and not (root and Path(path).is_relative_to(root)):
                folders.add(str(Path(path).resolve().parent))
    return sorted(folders)


# --------------------------------------------------------------------------------------------------
# The Gradio app
# --------------------------------------------------------------------------------------------------


def _import_gradio() -> Any:
    try:
        import gradio
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return gradio


def _placeholder() -> Any:
    """A grey square for results whose image file is unknown (indexes of Hub datasets)."""
    from PIL import Image

    return Image.new("RGB", (_PLACEHOLDER_SIZE, _PLACEHOLDER_SIZE), (200, 200, 200))


def _describe(name: str, index: GalleryIndex) -> str:
    info = index.info
    lines = [
        f"**{name}**: {len(index)} gallery images, {index.dim}-d embeddings",
        f"adapter `{info.get('adapter') or index.adapter_identity.name}` "
        f"(sha256 `{index.adapter_identity.sha256[:12]}`)",
        f"backbone `{info.get('backbone') or index.adapter_identity.backbone}`"
        + (f", {info['image_size']} px crops" if info.get("image_size") else ""),
    ]
    return "  \n".join(lines)


def _results_table(name: str, hits: Sequence[Hit]) -> str:
    rows = "\n".join(f"| {hit.rank} | {hit.score:.4f} | {hit.id} |" for hit in hits)
    return f"Top {len(hits)} in **{name}**\n\n| rank | score | id |\n|---:|---:|---|\n{rows}"


def build_app(
    indexes: Mapping[str, GalleryIndex | str | os.PathLike],
    *,
    default_k: int = DEFAULT_K,
    max_k: int = MAX_K,
    num_examples: int = NUM_EXAMPLES,
    title: str = "vpdml image retrieval",
    cache: AdapterCache | None = None,
) -> Any:
    """The demo as a ``gr.Blocks``: one entry per adapter, ``{name: GalleryIndex or index folder}``.

    The UI: a dropdown of the entries, a query image (upload or paste), ``num_examples`` gallery images to pick
    as the query, a ``k`` slider (``1..max_k``), a Search button, and the top-k gallery images with their rank,
    score and id as captions (plus the same as a table). Launch it with ``allowed_paths=image_folders(...)`` so
    that the gallery images can be served, or use :func:`launch_app`.
    """
    gr = _import_gradio()
    loaded = load_indexes(indexes)
    cache = cache or AdapterCache()
    names = list(loaded)
    max_k = max(1, min(int(max_k), max(len(index) for index in loaded.values())))
    default_k = max(1, min(int(default_k), max_k))
    examples = {name: example_items(index, num_examples) for name, index in loaded.items()}
    # one search at a time: loading an adapter onto a shared backbone changes the model
    busy = threading.Lock()

    def choose(name: str) -> tuple[Any, ...]:
        if name not in loaded:
            raise gr.Error(f"Unknown index {name!r}; choose one of: {', '.join(names)}.")
        items = examples[name]
        return _describe(name, loaded[name]), gr.Gallery(value=items, visible=bool(items)), None, ""

    def pick(name: str, event: Any) -> str:
        return examples[name][event.index][0]

    # Gradio passes the click (which example) to a parameter annotated gr.SelectData; with postponed annotations
    # it could not resolve the string "gr.SelectData" (gr is not a module global here), so set the class itself.
    pick.__annotations__["event"] = gr.SelectData

    def search(name: str, image: Any, k: float) -> tuple[list[tuple[Any, str]], str]:
        if name not in loaded:
            raise gr.Error(f"Unknown index {name!r}; choose one of: {', '.join(names)}.")
        if image is None:
            raise gr.Error("No query image: upload one or pick one of the examples first.")
        try:
            with busy:
                hits = search_image(loaded[name], cache.get(name, loaded[name]), image, int(k))
        except (ValueError, FileNotFoundError, KeyError, OSError, TypeError) as error:
            raise gr.Error(str(error)) from error
        gallery = [(hit.path or _placeholder(), hit.caption) for hit in hits]
        return gallery, _results_table(name, hits)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nChoose an adapter, upload a query image or pick one of its gallery images, and search: "
            "the gallery images most similar to the query under that adapter, best first, with their cosine "
            "scores."
        )
        with gr.Row():
            with gr.Column(scale=1):
                choice = gr.Dropdown(
                    choices=names, value=names[0], label="Adapter (gallery index)", elem_id="vpdml-index"
                )
                about = gr.Markdown(_describe(names[0], loaded[names[0]]), elem_id="vpdml-about")
                query = gr.Image(
                    type="filepath",
                    image_mode=None,  # the file as uploaded: the same pixels as when the gallery was indexed
                    sources=["upload", "clipboard"],
                    label="Query image",
                    elem_id="vpdml-query",
                )
                picks = gr.Gallery(
                    value=examples[names[0]],
                    visible=bool(examples[names[0]]),
                    label="Or pick a query from the gallery",
                    columns=4,
                    allow_preview=False,
                    interactive=False,
                    object_fit="contain",
                    elem_id="vpdml-examples",
                )
                k = gr.Slider(1, max_k, value=default_k, step=1, label="k (results)", elem_id="vpdml-k")
                button = gr.Button("Search", variant="primary", elem_id="vpdml-search")
            with gr.Column(scale=2):
                results = gr.Gallery(
                    label="Most similar gallery images (rank · score · id)",
                    columns=5,
                    object_fit="contain",
                    interactive=False,
                    elem_id="vpdml-results",
                )
                table = gr.Markdown(elem_id="vpdml-table")
        choice.change(choose, inputs=[choice], outputs=[about, picks, results, table])
        picks.select(pick, inputs=[choice], outputs=[query])
        button.click(search, inputs=[choice, query, k], outputs=[results, table])
    return demo


def launch_app(
    indexes: Mapping[str, GalleryIndex | str | os.PathLike],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
    **build_kwargs: Any,
) -> Any:
    """Build the app (:func:`build_app`) and serve it on ``host:port`` (default port: Gradio's, 7860 or the next
    free one). ``block=False`` returns the running ``gr.Blocks`` at once (``.local_url``; stop it with
    ``.close()``). ``share=True`` asks Gradio for a public link (needs internet)."""
    loaded = load_indexes(indexes)
    demo = build_app(loaded, **build_kwargs)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        prevent_thread_lock=not block,
        allowed_paths=image_folders(loaded),
        show_error=True,
        quiet=not block,
    )
    return demo
