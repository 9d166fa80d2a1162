"""The ``vpdml`` command line: ``train``, ``evaluate``, ``embed``, ``index build``, ``search``, ``app`` and ``demo``.

Examples::

    vpdml train --dataset cub200 --recipe cub200 --backbone google/vit-base-patch16-224-in21k --output-dir runs/cub
    accelerate launch -m vpdml.cli train --dataset sop --data-dir ./Stanford_Online_Products --recipe sop ...
    vpdml evaluate --adapter runs/cub --dataset cub200
    vpdml embed --adapter runs/cub --images ./photos --out photos.safetensors
    vpdml index build --adapter runs/cub --images ./photos --out photos.index
    vpdml search --index photos.index query.jpg -k 10
    vpdml app --index photos=photos.index            # a Gradio demo app (pip install "vpdml[app]")
    vpdml demo

Every :class:`vpdml.training.TrainingArguments` field and the adapter options of
:class:`vpdml.VisualPromptDMLConfig` are flags (``--learning-rate``, ``--num-prompts``...). Values come from, in
order of precedence: the command line, the ``--recipe``, the library defaults. :func:`add_train_arguments` builds
the ``train`` flags on any parser (``examples/train_dml.py`` uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

DEFAULT_BACKBONE = "google/vit-base-patch16-224-in21k"
NAMED_DATASETS = ("cub200", "cars196", "sop", "inshop", "imagefolder", "emoji")
# Recall@K conventions of the benchmarks (DESIGN.md section 2), used when neither a recipe nor --recall-at says.
DATASET_RECALL_AT = {"sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30, 40, 50)}
# Adapter options exposed as flags; the method decides semantic_proxies, the data num_classes.
ADAPTER_OPTIONS = (
    "num_prompts",
    "prompt_depth",
    "prompt_step",
    "bitfit",
    "pooling",
    "embedding_dim",
    "class_prompts",
    "class_prompt_depth",
    "class_prompt_step",
    "class_prompt_storage",
    "class_prompt_rank",
    "class_prompt_offload",
    "semantic_images_per_class",
    "fuse_proxy_pass",
    "proxy_keep_ratio",
    "gru_dropout",
    "proxy_mix_alpha",
    "proxy_anchor_scale",
    "proxy_anchor_margin",
    "proxy_anchor_positive_average",
    "proxy_negatives",
    "proxy_offload",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Run-level flags that are not TrainingArguments fields.
_TRAIN_EXTRAS = ("dataset", "data_dir", "validation_classes", "backbone", "recipe")


# --------------------------------------------------------------------------------------------------
# Flags generated from dataclass fields
# --------------------------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field type: bool, int, float, str, Literal, tuple[...]."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    if origin is tuple:
        members = typing.get_args(annotation)
        count = "+" if len(members) == 2 and members[1] is Ellipsis else len(members)
        return {"nargs": count, "type": members[0], "metavar": members[0].__name__.upper()}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"No command-line form for fields of type {annotation!r}.")


def _add_dataclass_flags(
    group: argparse._ArgumentGroup, cls: type, names: Sequence[str], *, required: Sequence[str] = ()
) -> None:
    """One ``--field-name`` flag per field; absent flags stay absent (``SUPPRESS``) so recipes can fill them."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name in names:
        field = fields[name]
        help_text = field.metadata.get("help", "")
        if field.default is not dataclasses.MISSING and name not in required:
            default = field.default
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})"
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            required=name in required,
            help=help_text.replace("%", "%%"),
            **_flag_kwargs(hints[name]),
        )


def _training_field_names() -> list[str]:
    from .training_args import TrainingArguments

    return [field.name for field in dataclasses.fields(TrainingArguments)]


def _count_or_fraction(text: str) -> int | float:
    """``10`` -> 10 classes, ``0.1`` -> 10 % of the training classes."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class count (10) or a fraction (0.1), got {text!r}"
        ) from None


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``train`` flag to ``parser`` (data, model, training, adapter options) and return it."""
    from . import VisualPromptDMLConfig
    from .training_args import RECIPES, TrainingArguments

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help=f"{', '.join(NAMED_DATASETS)} or a Hub dataset id with image and label columns. cub200/cars196 come "
        "from the Hub; sop, inshop and imagefolder (one sub-folder per class) read --data-dir; emoji is vpdml's "
        "offline cross-style benchmark.",
    )
    data.add_argument("--data-dir", help="Local folder of sop, inshop or imagefolder data.")
    data.add_argument(
        "--validation-classes",
        type=_count_or_fraction,
        default=0,
        help="Hold out training classes (a count, or a fraction like 0.1) as a validation split that picks the "
        "best checkpoint. Default 0: no validation split, the last weights are kept.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"Hub id or folder of the frozen ViT, or 'offline' for vpdml's built-in DINOv2 ViT-S/14 (default: "
        f"{DEFAULT_BACKBONE}).",
    )
    model.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="Start from a paper recipe: "
        + "; ".join(f"{name}: {recipe.description}" for name, recipe in RECIPES.items()),
    )

    training = parser.add_argument_group("training (TrainingArguments)")
    _add_dataclass_flags(training, TrainingArguments, _training_field_names(), required=("output_dir",))

    adapter = parser.add_argument_group("adapter (VisualPromptDMLConfig; the method sets semantic_proxies)")
    _add_dataclass_flags(adapter, VisualPromptDMLConfig, ADAPTER_OPTIONS)
    return parser


def training_settings(namespace: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``(TrainingArguments, adapter options)`` from parsed ``train`` flags: command line > recipe > defaults."""
    from .training_args import RECIPES, TrainingArguments

    given = vars(namespace)
    recipe = RECIPES[namespace.recipe] if getattr(namespace, "recipe", None) else None
    training = dict(recipe.training) if recipe else {}
    if "recall_at" not in training and namespace.dataset in DATASET_RECALL_AT:
        training["recall_at"] = DATASET_RECALL_AT[namespace.dataset]
    training.update({name: given[name] for name in _training_field_names() if name in given})
    adapter = dict(recipe.adapter) if recipe else {}
    if training.get("method") == "full-finetune":  # a recipe's prompt settings do not apply
        adapter = {}
    adapter.update({name: given[name] for name in ADAPTER_OPTIONS if name in given})
    return TrainingArguments(**training), adapter


def load_splits(dataset: str, data_dir: str | None, validation_classes: int | float, seed: int) -> Any:
    """DMLSplits of a named benchmark, an image folder, a Hub dataset, or the offline ``emoji`` benchmark."""
    if dataset == "emoji":
        if isinstance(validation_classes, float):
            raise ValueError("--dataset emoji takes an integer --validation-classes count.")
        from .offline import emoji_splits

        return emoji_splits(seed=seed, validation_classes=validation_classes)
    from .data import load_dml_dataset

    return load_dml_dataset(dataset, data_dir=data_dir, validation_classes=validation_classes, seed=seed)


def run_train(namespace: argparse.Namespace) -> Any:
    """Load data and backbone, build the model, train; prints the results table on the main process."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from .metrics import format_metrics_table
    from .training import build_model, load_backbone, load_image_processor, train

    args, adapter_options = training_settings(namespace)
    state = PartialState()
    if state.is_main_process:  # the run plan and resume notes of vpdml.training
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("vpdml").setLevel(logging.INFO)
    with state.main_process_first():  # one process downloads, the others read the cache
        splits = load_splits(namespace.dataset, namespace.data_dir, namespace.validation_classes, args.seed)
        backbone = load_backbone(namespace.backbone)
        processor = load_image_processor(namespace.backbone)
    if state.is_main_process:
        print(splits.summary(), flush=True)
    set_seed(args.seed)  # the adapter's initialisation
    model = build_model(backbone, args.method, splits.num_train_classes, **adapter_options)
    if args.image_size is None and not processor:
        args.image_size = int(getattr(backbone.config, "image_size", 224))
    result = train(model, splits, args, image_processor=processor)
    if state.is_main_process:
        rows = {}
        for split, metrics in result.metrics["trained"].items():
            rows[f"{split} zero-shot"] = result.metrics["zero_shot"].get(split, {})
            rows[f"{split} trained"] = metrics
        print(format_metrics_table(rows))
        print(f"Saved to {result.output_dir}" + (f" and {result.hub_url}" if result.hub_url else ""))
    return result


# --------------------------------------------------------------------------------------------------
# Loading a trained model (evaluate, embed)
# --------------------------------------------------------------------------------------------------


def load_trained_model(
    adapter: str, backbone: str | None = None, *, onto: Any = None, adapter_name: str = "default"
) -> tuple[Any, str | None]:
    """A trained model from an adapter folder or Hub repo (or a full fine-tuning folder), in eval mode.

    Returns ``(model, backbone name)``; the backbone is ``backbone`` or the adapter's
    ``base_model_name_or_path``. The adapter is loaded as ``adapter_name``. ``onto``: a ``PeftModel`` that already
    holds adapters on the same backbone; the adapter is added to it (PEFT ``load_adapter``, the active adapter
    does not change) instead of loading another copy of the backbone, and ``onto`` is returned.
    """
    from peft import PeftModel

    from .full_finetune import FullFineTuningDML
    from .hub import resolve_adapter_path
    from .training import load_backbone

    local = Path(adapter)
    if (local / "dml_head_config.json").is_file():  # full fine-tuning saves the whole model
        if onto is not None:
            raise ValueError(
                f"{adapter} is a full fine-tuning model: it cannot share a backbone with adapters."
            )
        return FullFineTuningDML.from_pretrained(local).eval(), backbone
    path = resolve_adapter_path(adapter)
    config = json.loads((path / "adapter_config.json").read_text())
    name = backbone or config.get("base_model_name_or_path")
    if not name:
        raise ValueError(
            f"{adapter} does not name its base model (adapter_config.json has no base_model_name_or_path): pass "
            "--backbone <Hub id or folder of the ViT it was trained on>."
        )
    if onto is not None:
        onto.load_adapter(str(path), adapter_name=adapter_name)
        return onto.eval(), name
    return PeftModel.from_pretrained(load_backbone(name), str(path), adapter_name=adapter_name).eval(), name


def trained_image_size(adapter: str) -> int | None:
    """The evaluation crop size recorded by `vpdml train` in the adapter folder's metrics.json, if any."""
    metrics_path = Path(adapter) / "metrics.json"
    if not metrics_path.is_file():
        return None
    size = json.loads(metrics_path.read_text()).get("image_size")
    return int(size) if size else None


def _eval_transform(model: Any, backbone_name: str | None, image_size: int | None) -> Any:
    from .data import transforms_from_processor
    from .training import load_image_processor

    processor = load_image_processor(backbone_name) if backbone_name else {}
    if image_size is None and not processor:
        backbone = model.base_model.model if hasattr(model, "base_model") else model.backbone
        image_size = int(getattr(backbone.config, "image_size", 224))
    return transforms_from_processor(processor, image_size)[1]


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        required=True,
        help="Folder written by `vpdml train` / save_pretrained, or a Hub repo id (owner/name).",
    )
    parser.add_argument(
        "--backbone",
        help="Backbone to load the adapter onto (default: the adapter's base_model_name_or_path).",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="Crop size (default: the size the adapter was trained at, from its metrics.json; else the image processor's).",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="Images per forward pass (default: 128).")
    parser.add_argument(
        "--zero-shot",
        action="store_true",
        help="Use the frozen backbone without the adapter (the baseline the adapter improves on).",
    )


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="As for `vpdml train` (a benchmark name or Hub id).")
    parser.add_argument("--data-dir", help="Local folder of sop, inshop or imagefolder data.")
    parser.add_argument(
        "--split",
        choices=("test", "validation", "all"),
        default="test",
        help="Split to score (validation needs the --validation-classes and --seed used in training).",
    )
    parser.add_argument(
        "--validation-classes",
        type=_count_or_fraction,
        default=0,
        help="As in training: rebuilds the same train/validation/test split.",
    )
    parser.add_argument("--seed", type=int, default=0, help="As in training (picks the validation classes).")
    parser.add_argument(
        "--recall-at",
        type=int,
        nargs="+",
        help="K of Recall@K (default: the benchmark's convention, else 1 2 4 8).",
    )
    parser.add_argument("--json", dest="json_path", help="Also write the metrics to this JSON file.")
    return parser


def run_evaluate(namespace: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Score an adapter on a benchmark split and print the Recall@K / MAP@R / R-Precision table."""
    from .evaluation import evaluate_splits
    from .metrics import format_metrics_table

    model, backbone_name = load_trained_model(namespace.adapter, namespace.backbone)
    image_size = namespace.image_size or trained_image_size(namespace.adapter)
    transform = _eval_transform(model, backbone_name, image_size)
    splits = load_splits(namespace.dataset, namespace.data_dir, namespace.validation_classes, namespace.seed)
    names = ["validation", "test"] if namespace.split == "all" else [namespace.split]
    if namespace.split == "all" and splits.validation is None:
        names = ["test"]
    recall_at = namespace.recall_at or DATASET_RECALL_AT.get(namespace.dataset, (1, 2, 4, 8))
    metrics = evaluate_splits(
        model,
        {name: splits.eval_sets(name) for name in names},
        transform,
        recall_at,
        batch_size=namespace.batch_size,
        zero_shot=namespace.zero_shot,
    )
    label = "zero-shot backbone" if namespace.zero_shot else "adapter"
    print(
        format_metrics_table({f"{splits.name} {name} ({label})": values for name, values in metrics.items()})
    )
    if namespace.json_path:
        from .atomic_io import atomic_write_json

        atomic_write_json(Path(namespace.json_path), metrics)
    return metrics


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------


def add_embed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_model_arguments(parser)
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


def image_folder_dataset(folder: Path) -> tuple[Any, list[str]]:
    """A ``datasets.Dataset`` (image, label) of every image under ``folder``, and the relative paths.

    Labels are the index of the top-level sub-folder (sorted) when every image lies in one, else -1.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {folder}.")
    relative = [p.relative_to(folder) for p in files]
    if all(len(r.parts) > 1 for r in relative):
        classes = sorted({r.parts[0] for r in relative})
        labels = [classes.index(r.parts[0]) for r in relative]
    else:
        labels = [-1] * len(files)
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict({"image": [str(p) for p in files], "label": labels}, features=features)
    return dataset, [r.as_posix() for r in relative]


def _hub_images(name: str, split: str, image_column: str, label_column: str) -> tuple[Any, list[str]]:
    import datasets

    dataset = datasets.load_dataset(name, split=split)
    if image_column not in dataset.column_names:
        raise KeyError(f"{name} has no image column {image_column!r} (columns: {dataset.column_names}).")
    if label_column in dataset.column_names:
        dataset = dataset.select_columns([image_column, label_column]).rename_columns(
            {image_column: "image", label_column: "label"}
        )
    else:
        dataset = dataset.select_columns([image_column]).rename_column(image_column, "image")
        dataset = dataset.add_column("label", [-1] * dataset.num_rows)
    return dataset, [f"{name}/{split}/{index}" for index in range(dataset.num_rows)]


def run_embed(namespace: argparse.Namespace) -> Path:
    """Embed images with an adapter and write the embeddings (+ labels and paths) to ``--out``."""
    import numpy as np

    from .atomic_io import atomic_save_safetensors
    from .evaluation import embed_dataset

    out = Path(namespace.out)
    if out.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"--out must end in .safetensors or .npz, got {out.name!r}.")
    model, backbone_name = load_trained_model(namespace.adapter, namespace.backbone)
    image_size = namespace.image_size or trained_image_size(namespace.adapter)
    transform = _eval_transform(model, backbone_name, image_size)
    source = Path(namespace.images)
    if source.is_dir():
        dataset, paths = image_folder_dataset(source)
    else:
        dataset, paths = _hub_images(
            namespace.images, namespace.split, namespace.image_column, namespace.label_column
        )
    embeddings, labels = embed_dataset(
        model, dataset, transform, batch_size=namespace.batch_size, zero_shot=namespace.zero_shot
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


def _load_for_index(
    adapter: str,
    backbone: str | None,
    image_size: int | None,
    *,
    onto: Any = None,
    adapter_name: str = "default",
) -> tuple[Any, Any, Any, dict]:
    """``(model, eval transform, AdapterIdentity, info)`` of an adapter folder or Hub repo.

    ``onto`` and ``adapter_name``: as for :func:`load_trained_model`; the identity is that of ``adapter_name``.
    """
    from .hub import resolve_adapter_path
    from .index import AdapterIdentity

    model, backbone_name = load_trained_model(adapter, backbone, onto=onto, adapter_name=adapter_name)
    image_size = image_size or trained_image_size(adapter)
    transform = _eval_transform(model, backbone_name, image_size)
    local = Path(adapter)
    if local.is_dir():
        source, revision = str(local.resolve()), None
    else:  # a Hub snapshot folder is named after its commit
        path = resolve_adapter_path(adapter)
        source, revision = adapter, path.name if path.parent.name == "snapshots" else None
    identity = AdapterIdentity.of_model(
        model, adapter_name, name=source, revision=revision, backbone=backbone_name
    )
    return (
        model,
        transform,
        identity,
        {"adapter": source, "backbone": backbone_name, "image_size": image_size},
    )


def load_index_model(
    index: Any,
    adapter: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    *,
    where: Any = "the index",
    onto: Any = None,
    adapter_name: str = "default",
) -> tuple[Any, Any, Any, dict]:
    """``(model, eval transform, AdapterIdentity, info)`` to embed queries for a :class:`~vpdml.index.GalleryIndex`.

    Reloads the adapter, backbone and crop size the index records (``index.info``, as `vpdml search` does);
    ``adapter``, ``backbone`` and ``image_size`` override them. ``where`` names the index in errors; ``onto`` and
    ``adapter_name``: as for :func:`load_trained_model` (load onto a model that already holds other adapters).
    """
    adapter = adapter or index.info.get("adapter") or index.adapter_identity.name
    if not adapter:
        raise ValueError(f"{where} does not record its adapter: pass --adapter.")
    return _load_for_index(
        adapter,
        backbone or index.info.get("backbone"),
        image_size or index.info.get("image_size"),
        onto=onto,
        adapter_name=adapter_name,
    )


def run_index(namespace: argparse.Namespace) -> Path:
    """``vpdml index build``: embed images into an index folder."""
    from .index import GalleryIndex

    model, transform, identity, info = _load_for_index(
        namespace.adapter, namespace.backbone, namespace.image_size
    )
    source = Path(namespace.images)
    if source.is_dir():
        images: Any = source
    else:
        images, _ = _hub_images(namespace.images, namespace.split, namespace.image_column, "label")
    index = GalleryIndex.build(
        model, images, transform, batch_size=namespace.batch_size, adapter_identity=identity
    )
    if not source.is_dir():
        index.info["images"] = f"{namespace.images}/{namespace.split}"
    index.info.update(info)
    out = index.save(namespace.out)
    print(f"Indexed {len(index)} images ({index.dim}-d embeddings, {identity.describe()}) in {out}")
    return out


def open_query_image(path: str | Path) -> Any:
    """A query image read as ``index build`` reads gallery files: transparency over white, 16-bit scaled.

    (``convert("RGB")`` would keep the colours hidden under transparent pixels, so a transparent PNG would not
    match its own gallery copy.)
    """
    from PIL import Image

    from .data.transforms import to_rgb

    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def run_search(namespace: argparse.Namespace) -> list[list[tuple[float, str]]]:
    """``vpdml search``: print the ``-k`` nearest gallery images of each query image."""
    from .index import GalleryIndex, embed_queries

    backend = getattr(namespace, "backend", "exact")
    if backend != "exact" and importlib.util.find_spec("faiss") is None:
        raise ValueError(
            f"--backend {backend} needs FAISS: `pip install vpdml[faiss]`, or use --backend exact."
        )
    index = GalleryIndex.load(namespace.index)
    model, transform, identity, _ = load_index_model(
        index, namespace.adapter, namespace.backbone, namespace.image_size, where=namespace.index
    )
    missing = [path for path in namespace.queries if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"No such query image(s): {', '.join(missing)}")
    images = [open_query_image(path) for path in namespace.queries]
    queries = embed_queries(
        model, images, transform, batch_size=namespace.batch_size, adapter_identity=identity
    )
    scores, ids = index.search(queries, namespace.k, backend=backend)
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
        from .app import INSTALL_HINT

        raise ValueError(INSTALL_HINT)
    from .app import launch_app

    return launch_app(
        indexes,
        host=namespace.host,
        port=namespace.port,
        share=namespace.share,
        default_k=namespace.k,
        max_k=namespace.max_k,
        num_examples=namespace.examples,
    )


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``vpdml`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="vpdml",
        description="Parameter-efficient deep metric learning (VPTSP: visual prompts + semantic proxies) as a PEFT "
        "adapter. Train an adapter on a retrieval benchmark, score it, or embed images with it.",
        epilog="Multi-GPU: `accelerate launch -m vpdml.cli train ...`. Run `vpdml <command> --help` for the flags.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_arguments(
        commands.add_parser(
            "train",
            help="train an adapter (or full fine-tuning) and evaluate it",
            description="Train on the training classes, pick the best checkpoint on --validation-classes (if any), "
            "evaluate zero-shot backbone vs trained on the held-out classes, and save the adapter, metrics.json, a "
            "model card and plots to --output-dir (optionally --push-to-hub).",
        )
    )
    add_evaluate_arguments(
        commands.add_parser(
            "evaluate",
            help="score an adapter: Recall@K, MAP@R, R-Precision",
            description="Embed a benchmark split with an adapter and print Recall@K, MAP@R and R-Precision.",
        )
    )
    add_embed_arguments(
        commands.add_parser(
            "embed",
            help="embed images with an adapter into a .safetensors/.npz file",
            description="Write L2-normalised embeddings of a folder of images (or a Hub dataset) to a file.",
        )
    )
    add_index_arguments(
        commands.add_parser(
            "index",
            help="build a gallery index of images for `vpdml search`",
            description="Gallery indexes: `vpdml index build --adapter A --images DIR --out INDEX`.",
        )
    )
    add_search_arguments(
        commands.add_parser(
            "search",
            help="find the images of an index most similar to query images",
            description="Embed query images with the index's adapter and print the -k most similar gallery images "
            "(rank, cosine score, path). A query embedded with another adapter is refused.",
        )
    )
    add_app_arguments(
        commands.add_parser(
            "app",
            help="a web app (Gradio) to search gallery indexes with query images",
            description="Serve a Gradio app: choose an adapter (one gallery index each), upload or pick a query "
            "image, see the top-k gallery images with their scores. Needs `pip install vpdml[app]`. See "
            "docs/retrieval.md.",
        )
    )
    commands.add_parser(
        "demo",
        help="offline end-to-end demo (built-in backbone and emoji benchmark); `vpdml demo --help` for options",
        add_help=False,
    )
    return parser


def _run_demo(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("vpdml.demo") is None:
        print("vpdml demo is not available in this installation.", file=sys.stderr)
        return 2
    result = importlib.import_module("vpdml.demo").main(list(argv))
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vpdml`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # the demo parses its own flags
        return _run_demo(argv[1:])
    namespace = build_parser().parse_args(argv)
    import vpdml  # noqa: F401  registers the PEFT type before any adapter is loaded

    handlers = {
        "train": run_train,
        "evaluate": run_evaluate,
        "embed": run_embed,
        "index": run_index,
        "search": run_search,
        "app": run_app,
    }
    try:
        handlers[namespace.command](namespace)
    # user errors (and a diverged run: NonFiniteLossError is a FloatingPointError): a message, not a traceback
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as error:
        print(f"vpdml {namespace.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
