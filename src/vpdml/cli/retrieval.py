"""``vpdml embed``, ``vpdml index build``, ``vpdml search`` and ``vpdml app``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpdml.cli.training import add_model_arguments

# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------


def add_embed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser)
    parser.add_argument(
        "--images",
        required=True,
        help="A folder of images (searched recursively; with one sub-folder per class the labels are the class "
        "indices in sorted order, else -1), or a Hub dataset id.",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="Output file: .safetensors (embeddings, labels; paths in the metadata) or .npz (embeddings, labels, "
        "paths).",
    )
    parser.add_argument("--split", default="train", help="Split of a Hub dataset (default: train).")
    parser.add_argument("--image-column", default="image", help="Image column of a Hub dataset.")
    parser.add_argument("--label-column", default="label", help="Label column of a Hub dataset (optional).")
    return parser


def run_embed(namespace: argparse.Namespace) -> Path:
    """Embed images with an adapter and write the embeddings (+ labels and paths) to ``--out``."""
    import numpy as np

    from vpdml.atomic_io import atomic_save_safetensors
    from vpdml.data.folders import hub_image_dataset, image_folder_dataset
    from vpdml.retrieval.embed import embed_dataset
    from vpdml.retrieval.embedder import ImageEmbedder

    out = Path(namespace.out)
    if out.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"--out must end in .safetensors or .npz, got {out.name!r}.")
    embedder = ImageEmbedder.from_pretrained(
        namespace.adapter, backbone=namespace.backbone, image_size=namespace.image_size
    )
    source = Path(namespace.images)
    if source.is_dir():
        dataset, paths = image_folder_dataset(source)
    else:
        dataset, paths = hub_image_dataset(
            namespace.images, namespace.split, namespace.image_column, namespace.label_column
        )
    embeddings, labels = embed_dataset(  # through a DataLoader, with the labels, and --zero-shot
        embedder.model,
        dataset,
        embedder.transform(),
        batch_size=namespace.batch_size,
        zero_shot=namespace.zero_shot,
    )
    if out.suffix == ".safetensors":
        metadata = {
            "format": "vpdml-embeddings/1",
            "adapter": str(namespace.adapter),
            "paths": json.dumps(paths),
        }
        atomic_save_safetensors({"embeddings": embeddings, "labels": labels}, out, metadata)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz")
        os.close(handle)
        try:
            np.savez(
                tmp, embeddings=embeddings.numpy(), labels=labels.numpy(), paths=np.array(paths, dtype=str)
            )
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"Wrote {embeddings.shape[0]} embeddings of size {embeddings.shape[1]} to {out}")
    return out


# --------------------------------------------------------------------------------------------------
# index build, search
# --------------------------------------------------------------------------------------------------


def _add_index_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--adapter",
        required=required,
        help="Folder written by `vpdml train` / save_pretrained, or a Hub repo id (owner/name)"
        + ("." if required else " (default: the adapter the index was built with)."),
    )
    parser.add_argument("--backbone", help="Backbone to load the adapter onto (default: its base model).")
    parser.add_argument(
        "--image-size", type=int, help="Crop size (default: the adapter's training size, as `vpdml embed`)."
    )
    parser.add_argument("--batch-size", type=int, default=128, help="Images per forward pass (default: 128).")


def add_index_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    actions = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="embed a folder of images (or a Hub dataset) into a searchable index folder",
        description="Embed every image under --images with an adapter and write a gallery index (embeddings as "
        "safetensors, ids/paths/adapter identity as JSON) to --out. See docs/retrieval.md.",
    )
    _add_index_model_arguments(build, required=True)
    build.add_argument(
        "--images", required=True, help="A folder of images (searched recursively) or a Hub dataset id."
    )
    build.add_argument("--out", required=True, help="Index folder to write.")
    build.add_argument("--split", default="train", help="Split of a Hub dataset (default: train).")
    build.add_argument("--image-column", default="image", help="Image column of a Hub dataset.")
    return parser


def add_search_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--index", required=True, help="Index folder written by `vpdml index build`.")
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="Query image file(s).")
    parser.add_argument("-k", type=int, default=10, help="Results per query (default: 10).")
    parser.add_argument(
        "--backend",
        choices=("exact", "faiss", "faiss-hnsw", "faiss-ivf"),
        default="exact",
        help="exact: chunked matmul (default); faiss: FAISS flat index (exact); faiss-hnsw, faiss-ivf: approximate "
        "FAISS indexes for large galleries. The FAISS ones need `pip install vpdml[faiss]`.",
    )
    _add_index_model_arguments(parser, required=False)
    return parser


def run_index(namespace: argparse.Namespace) -> Path:
    """``vpdml index build``: embed images into an index folder."""
    from vpdml.data.folders import hub_image_dataset
    from vpdml.retrieval.embedder import ImageEmbedder
    from vpdml.retrieval.index import GalleryIndex

    embedder = ImageEmbedder.from_pretrained(
        namespace.adapter, backbone=namespace.backbone, image_size=namespace.image_size
    )
    source = Path(namespace.images)
    if source.is_dir():
        images: Any = source
    else:
        images, _ = hub_image_dataset(namespace.images, namespace.split, namespace.image_column, "label")
    index = GalleryIndex.build(
        embedder.model,
        images,
        embedder.transform(),
        batch_size=namespace.batch_size,
        adapter_identity=embedder.identity(),
    )
    if not source.is_dir():
        index.info["images"] = f"{namespace.images}/{namespace.split}"
    index.info.update(embedder.info())
    out = index.save(namespace.out)
    print(
        f"Indexed {len(index)} images ({index.dim}-d embeddings, {embedder.identity().describe()}) in {out}"
    )
    return out


def run_search(namespace: argparse.Namespace) -> list[list[tuple[float, str]]]:
    """``vpdml search``: print the ``-k`` nearest gallery images of each query image."""
    from vpdml.retrieval.embedder import ImageEmbedder
    from vpdml.retrieval.index import GalleryIndex, QueryEmbeddings

    backend = getattr(namespace, "backend", "exact")
    if backend != "exact" and importlib.util.find_spec("faiss") is None:
        raise ValueError(
            f"--backend {backend} needs FAISS: `pip install vpdml[faiss]`, or use --backend exact."
        )
    index = GalleryIndex.load(namespace.index)
    embedder = ImageEmbedder.for_index(
        index,
        namespace.adapter,
        backbone=namespace.backbone,
        image_size=namespace.image_size,
        where=namespace.index,
    )
    missing = [path for path in namespace.queries if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"No such query image(s): {', '.join(missing)}")
    embeddings = embedder.encode(namespace.queries, batch_size=namespace.batch_size, convert_to="torch")
    scores, ids = index.search(QueryEmbeddings(embeddings, embedder.identity()), namespace.k, backend=backend)
    results = []
    for query, row_scores, row_ids in zip(namespace.queries, scores.tolist(), ids, strict=True):
        print(f"\nquery: {query}\n\n| rank | score | image |\n|---:|---:|---|")
        for rank, (score, item) in enumerate(zip(row_scores, row_ids, strict=True), start=1):
            print(f"| {rank} | {score:.4f} | {index.metadata.get(item, {}).get('path', item)} |")
        results.append(list(zip(row_scores, row_ids, strict=True)))
    return results


# --------------------------------------------------------------------------------------------------
# app
# --------------------------------------------------------------------------------------------------


def add_app_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--index",
        dest="indexes",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="A gallery index folder (from `vpdml index build`) listed as NAME in the app's adapter choice; repeat "
        "for several adapters. A bare PATH is named after its folder (emoji.index -> emoji).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to serve on (default: 127.0.0.1; 0.0.0.0 for the network).",
    )
    parser.add_argument("--port", type=int, help="Port (default: 7860, or the next free one).")
    parser.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Also ask Gradio for a temporary public share link (needs internet; default: --no-share).",
    )
    parser.add_argument("-k", type=int, default=5, help="Results shown at first (default: 5).")
    parser.add_argument("--max-k", type=int, default=50, help="Largest k of the slider (default: 50).")
    parser.add_argument(
        "--examples",
        type=int,
        default=8,
        help="Gallery images offered as example queries, per index (default: 8; 0: none).",
    )
    return parser


def parse_index_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["emoji=emoji.index", "products.index"]`` -> ``{"emoji": "emoji.index", "products": "products.index"}``."""
    indexes: dict[str, str] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator:
            name, path = Path(spec.rstrip("/\\")).stem, spec
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--index takes NAME=PATH or PATH, got {spec!r}.")
        if name in indexes:
            raise ValueError(f"Two --index entries are named {name!r}: give them distinct names (NAME=PATH).")
        indexes[name] = path
    return indexes


def run_app(namespace: argparse.Namespace) -> Any:
    """``vpdml app``: serve the Gradio demo (:mod:`vpdml.app`) over the given indexes until interrupted."""
    indexes = parse_index_specs(namespace.indexes)
    if importlib.util.find_spec("gradio") is None:
        from vpdml.app import INSTALL_HINT

        raise ValueError(INSTALL_HINT)
    from vpdml.app import launch_app

    return launch_app(
        indexes,
        host=namespace.host,
        port=namespace.port,
        share=namespace.share,
        default_k=namespace.k,
        max_k=namespace.max_k,
        num_examples=namespace.examples,
    )
