"""``vpdml train`` and ``vpdml evaluate``: flags generated from the config dataclasses, and their handlers."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

DEFAULT_BACKBONE = "google/vit-base-patch16-224-in21k"
NAMED_DATASETS = ("cub200", "cars196", "sop", "inshop", "imagefolder", "emoji", "icons", "kanji")
# Recall@K conventions of the benchmarks, used when neither a recipe nor --recall-at says.
DATASET_RECALL_AT = {"sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30, 40, 50)}
# Adapter options exposed as flags; the method decides semantic_proxies, the data num_classes.
ADAPTER_OPTIONS = (
    "num_prompts",
    "prompt_depth",
    "prompt_step",
    "prompt_init",
    "class_prompt_init",
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
    "proxy_pass_every",
    "proxy_pass_layers",
    "proxy_pass_tokens",
    "proxy_keep_ratio",
    "gru_dropout",
    "gru_init",
    "proxy_mix_alpha",
    "learnable_proxy_init",
    "proxy_mix",
    "semantic_proxy_init",
    "unseen_semantic_proxies",
    "proxy_head_init",
    "proxy_anchor_scale",
    "proxy_anchor_margin",
    "proxy_anchor_positive_average",
    "proxy_negatives",
    "proxy_offload",
)
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")


# --------------------------------------------------------------------------------------------------
# Flags generated from dataclass fields
# --------------------------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type of an optional field: ``none`` gives None (e.g. ``--proxy-pass-tokens none``: every token)."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field type: bool, int, float, str, Literal, tuple[...]; an optional int or
    float also takes ``none``."""
    optional = _unwrap_optional(annotation) is not annotation
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
    if annotation in (int, float) and optional:
        return {"type": _none_or(annotation)}
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
    from vpdml.training.args import TrainingArguments

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
    from vpdml.training.args import RECIPES, TrainingArguments
    from vpdml.tuner.config import VisualPromptDMLConfig

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help=f"{', '.join(NAMED_DATASETS)} or a Hub dataset id with image and label columns. cub200/cars196 come "
        "from the Hub; sop, inshop and imagefolder (one sub-folder per class) read --data-dir; emoji, icons and kanji are "
        "vpdml's offline cross-style benchmarks (kanji: about 28 images per class, as in CUB/Cars).",
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
    lora = parser.add_argument_group(
        "LoRA (--method lora: PEFT's LoRA on the backbone, vpdml's head and loss)"
    )
    lora.add_argument("--lora-rank", type=int, default=argparse.SUPPRESS, help="Rank r (default: 8).")
    lora.add_argument(
        "--lora-alpha", type=float, default=argparse.SUPPRESS, help="Scaling alpha (default: 16)."
    )
    lora.add_argument("--lora-dropout", type=float, default=argparse.SUPPRESS, help="Dropout (default: 0).")
    lora.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=argparse.SUPPRESS,
        help="Module names to adapt (default: the attention's query and value projections).",
    )
    lora.add_argument(
        "--lora-semantic-proxies",
        choices=("none", "ema", "gru"),
        default=argparse.SUPPRESS,
        help="Semantic proxies on top of LoRA: VPTSP's proxy pass through the LoRA backbone (--class-prompts, "
        "--proxy-pass-layers, --semantic-images-per-class, --proxy-mix-alpha apply; default: none).",
    )
    return parser


def training_settings(namespace: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``(TrainingArguments, adapter options)`` from parsed ``train`` flags: command line > recipe > defaults."""
    from vpdml.training.args import RECIPES, TrainingArguments

    given = vars(namespace)
    recipe = RECIPES[namespace.recipe] if getattr(namespace, "recipe", None) else None
    training = dict(recipe.training) if recipe else {}
    if "recall_at" not in training and namespace.dataset in DATASET_RECALL_AT:
        training["recall_at"] = DATASET_RECALL_AT[namespace.dataset]
    training.update({name: given[name] for name in _training_field_names() if name in given})
    if training.get("lr_scheduler", "cosine") != "cosine":  # a recipe's cosine shape does not apply either
        for name in ("lr_cosine_epochs", "lr_min"):
            if name not in given:
                training.pop(name, None)
    adapter = dict(recipe.adapter) if recipe else {}
    if training.get("method") in ("full-finetune", "lora"):  # a recipe's prompt settings do not apply
        adapter = {}
    adapter.update({name: given[name] for name in ADAPTER_OPTIONS if name in given})
    adapter.update({name: given[name] for name in LORA_FLAGS if name in given})
    if "lora_semantic_proxies" in given:
        adapter["semantic_proxies"] = given["lora_semantic_proxies"]
    return TrainingArguments(**training), adapter


def run_train(namespace: argparse.Namespace) -> Any:
    """Load data and backbone, build the model, train; prints the results table on the main process."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from vpdml.modules.loading import load_backbone, load_image_processor
    from vpdml.retrieval.metrics import format_metrics_table
    from vpdml.training.factory import build_model, load_splits
    from vpdml.training.trainer import train

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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_model_arguments(parser)
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
    from vpdml.retrieval.embedder import ImageEmbedder
    from vpdml.retrieval.evaluate import evaluate_splits
    from vpdml.retrieval.metrics import format_metrics_table
    from vpdml.training.factory import load_splits

    embedder = ImageEmbedder.from_pretrained(
        namespace.adapter, backbone=namespace.backbone, image_size=namespace.image_size
    )
    model, transform = embedder.model, embedder.transform()
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
        from vpdml.atomic_io import atomic_write_json

        atomic_write_json(Path(namespace.json_path), metrics)
    return metrics
