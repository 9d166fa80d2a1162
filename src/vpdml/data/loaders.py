"""Load DML benchmarks (CUB-200, Cars-196, SOP, In-Shop) or any labelled image dataset as DMLSplits.

Entry point: :func:`load_dml_dataset`. What each name reads:

- ``"cub200"``: Hub ``bentrevett/caltech-ucsd-birds-200-2011``; all per-image splits merged, then
  classes 0-99 train / 100-199 test (the standard class-disjoint split).
- ``"cars196"``: Hub ``pawlo2013/Cars196``; merged, classes 0-97 train / 98-195 test.
- ``"sop"``: the official Stanford Online Products folder (``Ebay_train.txt`` / ``Ebay_test.txt``).
- ``"inshop"``: the official In-Shop folder (``list_eval_partition.txt``): train, query and gallery.
- ``"imagefolder"``: a local folder with one sub-folder per class; classes split into halves.
- anything else: a Hub dataset id (or a ``datasets.Dataset``/``DatasetDict`` object), see
  :func:`from_hf_dataset`.

Every result passes through the same checks: image and integer label columns present, no empty split,
missing image files reported with examples, classes with a single image counted in a warning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value
from datasets import Image as ImageFeature
from tqdm.auto import tqdm

from vpdml.data.splits import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    DMLSplits,
    choose_validation_classes,
    class_halves,
    hold_out_validation,
    label_array,
    remap_labels,
    split_classes,
    warn_about_singleton_classes,
)

PathLike = str | Path


@dataclass(frozen=True)
class HubBenchmark:
    """A benchmark published on the Hub with per-image splits, to be re-split by class."""

    hub_id: str
    num_classes: int
    num_train_classes: int  # classes 0..num_train_classes-1 train, the rest test


HUB_BENCHMARKS: dict[str, HubBenchmark] = {
    "cub200": HubBenchmark("bentrevett/caltech-ucsd-birds-200-2011", num_classes=200, num_train_classes=100),
    "cars196": HubBenchmark("pawlo2013/Cars196", num_classes=196, num_train_classes=98),
}

SOP_SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
INSHOP_PARTITION_FILE = "list_eval_partition.txt"
INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]
INSHOP_STATUSES = ("train", "query", "gallery")
FOLDER_BENCHMARKS = ("sop", "inshop", "imagefolder")


def load_dml_dataset(
    name: str | Dataset | DatasetDict,
    *,
    data_dir: PathLike | None = None,
    validation_classes: int | float = 0,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    image_column: str = IMAGE_COLUMN,
    label_column: str = LABEL_COLUMN,
    train_fraction: float = 0.5,
    **load_dataset_kwargs: Any,
) -> DMLSplits:
    """Load a DML benchmark or labelled image dataset as class-disjoint :class:`DMLSplits`.

    Args:
        name: ``"cub200"``, ``"cars196"``, ``"sop"``, ``"inshop"``, ``"imagefolder"``, a Hub dataset id,
            or a ``datasets.Dataset``/``DatasetDict``.
        data_dir: the local folder for ``"sop"``, ``"inshop"`` and ``"imagefolder"`` (required there).
        validation_classes: training classes to hold out for model selection: an int count or a float
            fraction; 0 for none. They are never test classes.
        seed: seeds the choice of validation classes. (Generic datasets split their classes in sorted
            id order, like the CUB/Cars convention; use :func:`from_hf_dataset` to shuffle them.)
        cache_dir: passed to ``datasets.load_dataset`` (Hub and imagefolder loading).
        image_column, label_column: column names in generic datasets (ignored by the named benchmarks).
        train_fraction: fraction of classes used for training by generic datasets and ``imagefolder``.
        **load_dataset_kwargs: forwarded to ``datasets.load_dataset`` (e.g. ``revision=``).
    """
    # validation classes are drawn inside each loader, before any split is materialised
    held_out: dict[str, Any] = {"validation_classes": validation_classes, "seed": seed}
    if isinstance(name, Dataset | DatasetDict):
        splits = from_hf_dataset(
            name,
            image_column=image_column,
            label_column=label_column,
            train_fraction=train_fraction,
            **held_out,
        )
    elif name in HUB_BENCHMARKS:
        splits = _load_hub_benchmark(
            name, cache_dir=cache_dir, load_dataset_kwargs=load_dataset_kwargs, **held_out
        )
    elif name == "sop":
        splits = load_sop(_require_dir(name, data_dir), **held_out)
    elif name == "inshop":
        splits = load_inshop(_require_dir(name, data_dir), **held_out)
    elif name == "imagefolder":
        folder = _require_dir(name, data_dir)
        splits = load_imagefolder(folder, cache_dir=cache_dir, train_fraction=train_fraction, **held_out)
    else:
        hub_dataset = datasets.load_dataset(name, cache_dir=_as_str(cache_dir), **load_dataset_kwargs)
        splits = from_hf_dataset(
            hub_dataset,
            name=name,
            image_column=image_column,
            label_column=label_column,
            train_fraction=train_fraction,
            **held_out,
        )
    warn_about_singleton_classes(splits.train, f"{splits.name}/train")
    return splits


def from_hf_dataset(
    dataset: Dataset | DatasetDict,
    *,
    name: str | None = None,
    image_column: str = IMAGE_COLUMN,
    label_column: str = LABEL_COLUMN,
    train_classes: Iterable[int] | None = None,
    test_classes: Iterable[int] | None = None,
    train_fraction: float = 0.5,
    class_seed: int | None = None,
    validation_classes: int | float = 0,
    seed: int = 0,
) -> DMLSplits:
    """Make class-disjoint :class:`DMLSplits` from any labelled ``datasets`` image dataset.

    All splits of a ``DatasetDict`` are merged first (Hub copies split per image, DML splits per class).
    Classes are then split by ``train_classes``/``test_classes`` when given, otherwise into the first
    ``train_fraction`` of sorted class ids and the rest (shuffled first if ``class_seed`` is set).
    ``validation_classes`` (a count or a fraction) of the *training* classes, drawn with ``seed``, form
    a validation split. The image column may hold images or file paths; labels must be integers
    (``ClassLabel`` or int).
    """
    merged = standardize_columns(_merge_splits(dataset), image_column=image_column, label_column=label_column)
    if (train_classes is None) != (test_classes is None):
        raise ValueError("Pass both train_classes and test_classes, or neither (to split by train_fraction).")
    if train_classes is None or test_classes is None:
        train_classes, test_classes = class_halves(label_array(merged), class_seed, train_fraction)
    groups = {"train": np.fromiter(train_classes, dtype=np.int64), "test": test_classes}
    if validation_classes:
        groups["train"], groups["validation"] = choose_validation_classes(
            groups["train"], validation_classes, seed
        )
    # one relabelling pass over the merged data, then lazy selections: the images are never copied
    parts = split_classes(merged, groups)
    name = name or "dataset"
    warn_about_singleton_classes(parts["test"], f"{name}/test")
    return DMLSplits(name=name, train=parts["train"], test=parts["test"], validation=parts.get("validation"))


def _with_validation(splits: DMLSplits, validation_classes: int | float, seed: int) -> DMLSplits:
    """Hold out training classes of already-split data (the folder benchmarks, whose tables are small)."""
    if not validation_classes:
        return splits
    train, validation = hold_out_validation(splits.train, validation_classes, seed=seed)
    return dataclasses.replace(splits, train=train, validation=validation)


def standardize_columns(dataset: Dataset, *, image_column: str, label_column: str) -> Dataset:
    """Keep only the image and label columns, named ``image`` and ``label``, with checked types."""
    for role, column in (("image", image_column), ("label", label_column)):
        if column not in dataset.column_names:
            raise KeyError(
                f"Dataset has no {role} column {column!r} (columns: {dataset.column_names}). "
                f"Pass `{role}_column=` with the right name."
            )
    if image_column == label_column:
        raise ValueError(f"image_column and label_column are both {image_column!r}.")
    if dataset.num_rows == 0:
        raise ValueError("Dataset is empty: no images to split.")
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns(
        {old: new for old, new in ((image_column, IMAGE_COLUMN), (label_column, LABEL_COLUMN)) if old != new}
    )
    label_feature = dataset.features[LABEL_COLUMN]
    if not isinstance(label_feature, ClassLabel) and not (
        isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint"))
    ):
        raise TypeError(
            f"Label column {label_column!r} must be a ClassLabel or an integer, got {label_feature}. "
            f"Encode string labels first: `dataset = dataset.class_encode_column({label_column!r})`."
        )
    if (label_array(dataset) < 0).any():
        raise ValueError(
            f"Label column {label_column!r} has negative labels (unlabelled rows?); filter them out first."
        )
    return _ensure_image_feature(dataset, image_column)


def load_sop(data_dir: PathLike, *, validation_classes: int | float = 0, seed: int = 0) -> DMLSplits:
    """Read the official Stanford Online Products folder.

    ``Ebay_train.txt`` / ``Ebay_test.txt`` have a header ``image_id class_id super_class_id path`` and
    one row per image; ``path`` is relative to ``data_dir``. The official split has 11,318 train and
    11,316 test classes (59,551 / 60,502 images).
    """
    folder = Path(data_dir)
    parts: dict[str, Dataset] = {}
    for split_name, file_name in SOP_SPLIT_FILES.items():
        rows = _read_table(folder / file_name, SOP_HEADER, header_lines=1, dataset="SOP")
        paths = [folder / row[3] for row, _ in rows]
        labels = [_parse_int(row[1], where) for row, where in rows]
        parts[split_name] = _dataset_from_files(paths, labels, f"sop/{split_name}")
    test = remap_labels(parts["test"])
    warn_about_singleton_classes(test, "sop/test")
    splits = DMLSplits(name="sop", train=remap_labels(parts["train"]), test=test)
    return _with_validation(splits, validation_classes, seed)


def load_inshop(data_dir: PathLike, *, validation_classes: int | float = 0, seed: int = 0) -> DMLSplits:
    """Read the official In-Shop Clothes Retrieval folder.

    ``list_eval_partition.txt`` (in ``data_dir`` or ``data_dir/Eval``) starts with the number of images,
    then the header ``image_name item_id evaluation_status``; each row says whether an image is in
    ``train``, ``query`` or ``gallery``. Labels are the item ids (``id_00000002`` -> 2). Image names are
    resolved against ``data_dir`` or ``data_dir/Img`` (the official archive's layout). Query and gallery
    share one label mapping, so equal labels mean the same item.
    """
    folder = Path(data_dir)
    partition_file = _find_first_existing(
        [folder / INSHOP_PARTITION_FILE, folder / "Eval" / INSHOP_PARTITION_FILE]
    )
    if partition_file is None:
        raise FileNotFoundError(
            f"In-Shop: no {INSHOP_PARTITION_FILE} in {folder} or {folder / 'Eval'}. Point data_dir at the "
            "unpacked 'In-shop Clothes Retrieval Benchmark' folder."
        )
    rows = _read_table(partition_file, INSHOP_HEADER, header_lines=2, dataset="In-Shop")
    image_root = _inshop_image_root(folder, rows[0][0][0]) if rows else folder
    columns: dict[str, tuple[list[Path], list[int]]] = {status: ([], []) for status in INSHOP_STATUSES}
    for row, where in rows:
        image_name, item_id, status = row
        if status not in columns:
            raise ValueError(f"{where}: evaluation_status {status!r} is not one of {INSHOP_STATUSES}.")
        columns[status][0].append(image_root / image_name)
        columns[status][1].append(_parse_item_id(item_id, where))
    parts = {status: _dataset_from_files(*columns[status], f"inshop/{status}") for status in INSHOP_STATUSES}
    query, gallery = _remap_jointly(parts["query"], parts["gallery"])
    splits = DMLSplits(name="inshop", train=remap_labels(parts["train"]), query=query, gallery=gallery)
    return _with_validation(splits, validation_classes, seed)


def load_imagefolder(
    data_dir: PathLike,
    *,
    cache_dir: PathLike | None = None,
    train_fraction: float = 0.5,
    validation_classes: int | float = 0,
    seed: int = 0,
) -> DMLSplits:
    """Load a local folder with one sub-folder per class, split into class-disjoint halves.

    Uses ``datasets.load_dataset("imagefolder", data_dir=...)``; the first ``train_fraction`` of the
    (alphabetically sorted) class folders train, the rest test; ``validation_classes`` of the training
    folders (a count or a fraction, drawn with ``seed``) form a validation split.
    """
    folder_dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(data_dir), cache_dir=_as_str(cache_dir)
    )
    return from_hf_dataset(
        folder_dataset,
        name=f"imagefolder:{Path(data_dir).name}",
        train_fraction=train_fraction,
        validation_classes=validation_classes,
        seed=seed,
    )


def _load_hub_benchmark(
    name: str,
    *,
    cache_dir: PathLike | None,
    load_dataset_kwargs: dict[str, Any],
    validation_classes: int | float,
    seed: int,
) -> DMLSplits:
    """Download (or read from cache) a Hub benchmark and apply its standard class split."""
    benchmark = HUB_BENCHMARKS[name]
    hub_dataset = datasets.load_dataset(benchmark.hub_id, cache_dir=_as_str(cache_dir), **load_dataset_kwargs)
    merged = standardize_columns(
        _merge_splits(hub_dataset), image_column=IMAGE_COLUMN, label_column=LABEL_COLUMN
    )
    num_classes = np.unique(label_array(merged)).size
    if num_classes != benchmark.num_classes:
        raise ValueError(
            f"{name}: expected {benchmark.num_classes} classes in {benchmark.hub_id}, found {num_classes}. "
            "The Hub copy may have changed; load it with from_hf_dataset(..., train_classes=, test_classes=)."
        )
    train_classes = range(benchmark.num_train_classes)
    test_classes = range(benchmark.num_train_classes, benchmark.num_classes)
    return from_hf_dataset(
        merged,
        name=name,
        train_classes=train_classes,
        test_classes=test_classes,
        validation_classes=validation_classes,
        seed=seed,
    )


def _merge_splits(dataset: Dataset | DatasetDict) -> Dataset:
    """One Dataset from all splits of a DatasetDict (DML re-splits by class, not by image)."""
    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, DatasetDict):
        if not dataset:
            raise ValueError("DatasetDict has no splits.")
        return datasets.concatenate_datasets(list(dataset.values()))
    raise TypeError(
        f"Expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}. Streaming "
        "(Iterable) datasets are not supported: DML needs random access for class-balanced batches."
    )


def _ensure_image_feature(dataset: Dataset, original_name: str) -> Dataset:
    """Make the ``image`` column a ``datasets.Image`` feature; file paths are cast, other types refused."""
    feature = dataset.features[IMAGE_COLUMN]
    if isinstance(feature, ImageFeature):
        return dataset
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return dataset.cast_column(IMAGE_COLUMN, ImageFeature())
    raise TypeError(
        f"Image column {original_name!r} must be a datasets.Image feature or file paths, got {feature}."
    )


def _dataset_from_files(paths: list[Path], labels: list[int], where: str) -> Dataset:
    """A lazily-decoded image dataset from file paths, after checking that the files exist."""
    if not paths:
        raise ValueError(f"{where} is empty: its list file has no rows.")
    checks = tqdm(paths, desc=f"Checking {where} files", unit="file", disable=len(paths) < 20_000)
    missing = [path for path in checks if not path.is_file()]
    if missing:
        examples = ", ".join(str(path) for path in missing[:3])
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(paths)} image files are missing (e.g. {examples}). "
            "Check data_dir points at the folder the list file's paths are relative to."
        )
    table = {IMAGE_COLUMN: [str(path) for path in paths], LABEL_COLUMN: labels}
    features = datasets.Features({IMAGE_COLUMN: ImageFeature(), LABEL_COLUMN: Value("int64")})
    return Dataset.from_dict(table, features=features)


def _read_table(
    path: Path, header: list[str], *, header_lines: int, dataset: str
) -> list[tuple[list[str], str]]:
    """Rows (whitespace-split) of a benchmark list file, each with a ``file:line`` tag for error messages.

    The last line of ``header_lines`` must equal ``header``, so a wrong file is caught before parsing.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: list file {path} not found. Check data_dir.")
    lines = path.read_text().splitlines()
    if len(lines) < header_lines or lines[header_lines - 1].split() != header:
        found = lines[header_lines - 1] if len(lines) >= header_lines else "<missing>"
        raise ValueError(
            f"{path}:{header_lines}: expected the header {' '.join(header)!r}, found {found!r}. "
            f"Is this the official {dataset} file?"
        )
    rows = []
    for line_number, line in enumerate(lines[header_lines:], start=header_lines + 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{line_number}"
        if len(fields) != len(header):
            raise ValueError(f"{where}: expected {len(header)} fields ({' '.join(header)}), got {line!r}.")
        rows.append((fields, where))
    return rows


def _parse_int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{where}: class id {text!r} is not an integer.") from None


def _parse_item_id(item_id: str, where: str) -> int:
    """In-Shop item ids look like ``id_00000002``; the number is the label."""
    match = re.fullmatch(r"id_(\d+)", item_id)
    if match is None:
        raise ValueError(f"{where}: item_id {item_id!r} does not look like 'id_00000002'.")
    return int(match.group(1))


def _inshop_image_root(folder: Path, first_image_name: str) -> Path:
    """Where In-Shop image names are relative to: ``data_dir`` or the official archive's ``Img``."""
    root = _find_first_existing([folder / first_image_name, folder / "Img" / first_image_name])
    if root is None:
        raise FileNotFoundError(
            f"In-Shop: image {first_image_name!r} is neither in {folder} nor in {folder / 'Img'}. "
            "Unpack img.zip next to list_eval_partition.txt (or under Img/)."
        )
    return folder if root == folder / first_image_name else folder / "Img"


def _remap_jointly(query: Dataset, gallery: Dataset) -> tuple[Dataset, Dataset]:
    """Remap query and gallery labels with one shared mapping (equal labels = same item)."""
    num_query = query.num_rows
    both = remap_labels(datasets.concatenate_datasets([query, gallery]))
    return both.select(range(num_query)), both.select(range(num_query, both.num_rows))


def _find_first_existing(candidates: list[Path]) -> Path | None:
    return next((path for path in candidates if path.exists()), None)


def _require_dir(name: str, data_dir: PathLike | None) -> Path:
    if data_dir is None:
        raise ValueError(f"{name!r} is read from a local folder: pass data_dir='path/to/{name}'.")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: data_dir {folder} is not a directory.")
    return folder


def _as_str(path: PathLike | None) -> str | None:
    return None if path is None else str(path)
