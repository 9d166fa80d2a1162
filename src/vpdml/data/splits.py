"""Class-disjoint dataset splits for deep metric learning.

DML benchmarks train on one set of classes and evaluate retrieval on *other* classes. This module
holds the :class:`DMLSplits` container and the functions that cut a labelled ``datasets.Dataset``
into such splits.

Conventions every split follows:

- columns ``image`` (a ``datasets.Image`` feature) and ``label`` (int64);
- ``label`` is contiguous ``0..K-1`` *within the split* (the tuner's class prompts and proxies are
  indexed by training labels, so training labels must be dense);
- ``original_label`` keeps the source dataset's label (with its ``ClassLabel`` names when the
  source had them), so results can be traced back to real classes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from datasets import Dataset

LABEL_COLUMN = "label"
IMAGE_COLUMN = "image"
ORIGINAL_LABEL_COLUMN = "original_label"

SplitName = Literal["test", "validation"]


def label_array(dataset: Dataset, label_column: str = LABEL_COLUMN) -> np.ndarray:
    """Return the labels of ``dataset`` as an int64 numpy array, without decoding any image.

    Reads the Arrow column directly (``dataset[label_column]`` would build Python objects row by row,
    which takes seconds on SOP-sized sets).
    """
    if label_column not in dataset.column_names:
        raise KeyError(
            f"Dataset has no label column {label_column!r} (columns: {dataset.column_names}). "
            "Pass the right `label_column=` name."
        )
    column = dataset.with_format("arrow", columns=[label_column])[:][label_column]
    labels = column.to_numpy()
    if labels.dtype.kind not in "iu":
        raise TypeError(
            f"Label column {label_column!r} must hold integers, got dtype {labels.dtype} "
            f"(first values: {list(labels[:3])}). Encode string labels first, e.g. "
            f"`dataset = dataset.class_encode_column({label_column!r})`."
        )
    return labels.astype(np.int64, copy=False)


def remap_labels(dataset: Dataset) -> Dataset:
    """Rewrite ``label`` as contiguous ``0..K-1`` (in sorted order of the current labels).

    The first remap moves the source label to ``original_label``; later remaps (e.g. after holding out
    validation classes) keep that column, so it always points at the source dataset's classes.
    """
    _, dense_labels = np.unique(label_array(dataset), return_inverse=True)
    return _replace_labels(dataset, dense_labels)


def _replace_labels(dataset: Dataset, new_labels: np.ndarray) -> Dataset:
    """Put ``new_labels`` in ``label``, keeping the source labels in ``original_label``.

    ``add_column`` copies the whole table (images included) when ``dataset`` is a ``select``-ed view;
    :func:`split_classes` therefore relabels the unselected dataset once and selects afterwards.
    """
    if ORIGINAL_LABEL_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(LABEL_COLUMN)
    else:
        dataset = dataset.rename_column(LABEL_COLUMN, ORIGINAL_LABEL_COLUMN)
    return dataset.add_column(LABEL_COLUMN, new_labels.astype(np.int64).tolist())


def split_classes(dataset: Dataset, class_groups: Mapping[str, Iterable[int]]) -> dict[str, Dataset]:
    """Cut ``dataset`` into parts by disjoint groups of (current) labels, e.g. train / validation / test.

    Each part's labels are remapped to ``0..K-1`` in sorted order of its classes; ``original_label``
    keeps the source label. Rows whose label is in no group are dropped. The labels are rewritten in one
    pass over the whole dataset and the parts are lazy row selections, so images are not copied.
    """
    labels = label_array(dataset)
    groups = {name: np.unique(np.fromiter(classes, dtype=np.int64)) for name, classes in class_groups.items()}
    _check_class_groups(groups, labels)
    new_labels = np.full(labels.shape, -1, dtype=np.int64)  # rows outside every group are dropped below
    rows_of_group = {}
    for name, classes in groups.items():
        members = np.isin(labels, classes)
        rows_of_group[name] = np.flatnonzero(members)
        new_labels[members] = np.searchsorted(classes, labels[members])
    relabelled = _replace_labels(dataset, new_labels)
    return {name: relabelled.select(rows) for name, rows in rows_of_group.items()}


def _check_class_groups(groups: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
    """Groups must be non-empty, pairwise disjoint, and name only classes present in ``labels``."""
    seen: dict[int, str] = {}
    for name, classes in groups.items():
        if classes.size == 0:
            raise ValueError(f"The {name!r} class group is empty; give it at least one class.")
        missing = np.setdiff1d(classes, labels)
        if missing.size:
            raise ValueError(
                f"{missing.size} {name} classes do not occur in the dataset (e.g. {missing[:5].tolist()}); "
                f"its labels range over {labels.min()}..{labels.max()}. Check the class ids you passed."
            )
        shared = [int(c) for c in classes if int(c) in seen]
        if shared:
            raise ValueError(
                f"Class groups must be disjoint in metric learning: {len(shared)} {name} classes are also "
                f"{seen[shared[0]]} classes (e.g. {shared[:5]})."
            )
        seen.update((int(c), name) for c in classes)


def select_classes(dataset: Dataset, classes: Iterable[int]) -> Dataset:
    """Rows of ``dataset`` whose (current) label is in ``classes``, labels remapped to ``0..K-1``."""
    return split_classes(dataset, {"selected": classes})["selected"]


def split_by_class(
    dataset: Dataset, train_classes: Iterable[int], test_classes: Iterable[int]
) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into a train and a test part by (disjoint) label sets.

    Both parts get contiguous labels; ``original_label`` keeps the label they had in ``dataset``.
    Rows whose label is in neither set are dropped.
    """
    parts = split_classes(dataset, {"train": train_classes, "test": test_classes})
    return parts["train"], parts["test"]


def class_halves(
    classes: np.ndarray, seed: int | None = None, train_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Split class ids into train and test ids.

    With ``seed=None`` the first ``train_fraction`` of the sorted ids go to train (the CUB/Cars
    benchmark convention: classes 1-100 train, 101-200 test); with a seed the ids are shuffled first.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be strictly between 0 and 1, got {train_fraction}.")
    classes = np.unique(classes)
    if classes.size < 2:
        raise ValueError(f"Need at least 2 classes to make class-disjoint splits, found {classes.size}.")
    if seed is not None:
        classes = np.random.default_rng(seed).permutation(classes)
    num_train = min(max(round(classes.size * train_fraction), 1), classes.size - 1)
    return classes[:num_train], classes[num_train:]


def class_disjoint_halves(
    dataset: Dataset, seed: int | None = None, train_fraction: float = 0.5
) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` by class into a train part and a test part (see :func:`class_halves`)."""
    train_classes, test_classes = class_halves(label_array(dataset), seed, train_fraction)
    return split_by_class(dataset, train_classes, test_classes)


def resolve_class_count(amount: int | float, num_classes: int, what: str = "validation classes") -> int:
    """Turn ``amount`` (an int count, or a float fraction in (0, 1)) into a number of classes."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise TypeError(f"Number of {what} must be an int count or a float fraction, got {amount!r}.")
    if isinstance(amount, float):
        if not 0.0 < amount < 1.0:
            raise ValueError(
                f"A fraction of {what} must be in (0, 1), got {amount}; pass an int for a count."
            )
        count = max(1, math.floor(amount * num_classes))
    else:
        count = amount
    if not 0 < count < num_classes:
        raise ValueError(
            f"Cannot hold out {count} {what} from {num_classes} training classes: keep at least one "
            "class for training and hold out at least one."
        )
    return count


def choose_validation_classes(
    train_classes: np.ndarray, amount: int | float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split training class ids into ``(kept, held_out)``; ``amount`` is a count or a fraction."""
    train_classes = np.unique(train_classes)
    count = resolve_class_count(amount, train_classes.size)
    held_out = np.sort(np.random.default_rng(seed).choice(train_classes, size=count, replace=False))
    return np.setdiff1d(train_classes, held_out), held_out


def hold_out_validation(train: Dataset, classes: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Move some *training* classes into a validation split, for model selection.

    Selecting checkpoints on the test classes overstates results (the official VPTSP code does it);
    validating on held-out training classes keeps the test classes unseen. ``classes`` is a count (int)
    or a fraction of the training classes (float). Returns ``(train, validation)``, both with
    contiguous labels; ``original_label`` still refers to the source dataset. (On a ``select``-ed
    view this copies the table once; the loaders hold classes out before splitting instead.)
    """
    kept, held_out = choose_validation_classes(label_array(train), classes, seed)
    parts = split_classes(train, {"train": kept, "validation": held_out})
    return parts["train"], parts["validation"]


def count_singleton_classes(dataset: Dataset) -> int:
    """Number of classes with a single image (they cannot form a positive pair with another image)."""
    _, counts = np.unique(label_array(dataset), return_counts=True)
    return int((counts == 1).sum())


def warn_about_singleton_classes(dataset: Dataset, split_name: str) -> None:
    """Warn when a split has classes with one image.

    In training, Proxy Anchor still pulls such an image to its proxy, but a class-balanced sampler must
    repeat the image to fill ``m`` slots, and pair-based losses get no positive from it. In evaluation,
    a query from such a class has no relevant item, so its Recall@K is always 0.
    """
    singletons = count_singleton_classes(dataset)
    if singletons:
        warnings.warn(
            f"{singletons} classes in the {split_name!r} split have a single image: they give no positive "
            "pair (training) or no relevant item (retrieval).",
            stacklevel=3,
        )


class EvalSets(NamedTuple):
    """What a retrieval evaluation compares: ``query`` images searched against ``gallery`` images.

    ``same_set`` is True when query and gallery are the same images (CUB, Cars, SOP): each query must
    then be excluded from its own results.
    """

    query: Dataset
    gallery: Dataset
    same_set: bool


@dataclass
class DMLSplits:
    """The splits of one DML benchmark.

    ``train`` is always present. CUB/Cars/SOP-style benchmarks evaluate on ``test`` (query = gallery);
    In-Shop-style ones on ``query`` against ``gallery``. ``validation`` holds training classes set aside
    for model selection. Every split has ``image``, ``label`` (contiguous in ``train``) and usually
    ``original_label``.
    """

    name: str
    train: Dataset
    test: Dataset | None = None
    validation: Dataset | None = None
    query: Dataset | None = None
    gallery: Dataset | None = None

    def __post_init__(self) -> None:
        for split_name, split in self._present_splits():
            _check_split_schema(split, f"{self.name}/{split_name}")
        train_classes = np.unique(label_array(self.train))
        if not np.array_equal(train_classes, np.arange(train_classes.size)):
            raise ValueError(
                f"{self.name}/train labels must be contiguous 0..C-1 (class prompts and proxies are indexed "
                f"by them); got {train_classes.size} classes spanning {train_classes.min()}.."
                f"{train_classes.max()}. Use vpdml.data.remap_labels(train) first."
            )
        if (self.query is None) != (self.gallery is None):
            raise ValueError(f"{self.name}: query and gallery must be given together.")

    def _present_splits(self) -> list[tuple[str, Dataset]]:
        splits = {
            "train": self.train,
            "test": self.test,
            "validation": self.validation,
            "query": self.query,
            "gallery": self.gallery,
        }
        return [(name, split) for name, split in splits.items() if split is not None]

    @property
    def num_train_classes(self) -> int:
        """Number of training classes C (labels are ``0..C-1``)."""
        return int(label_array(self.train).max()) + 1

    def eval_sets(self, split: SplitName = "test") -> EvalSets:
        """Query and gallery sets for evaluating on ``split`` (``"test"`` or ``"validation"``).

        For ``"test"``, a benchmark with a query/gallery pair (In-Shop) returns those; otherwise the test
        set is searched against itself. Validation is always searched against itself.
        """
        if split == "validation":
            if self.validation is None:
                raise ValueError(
                    f"{self.name} has no validation split; load it with `validation_classes=` > 0 "
                    "(held-out training classes)."
                )
            return EvalSets(self.validation, self.validation, same_set=True)
        if split != "test":
            raise ValueError(f"Unknown evaluation split {split!r}; use 'test' or 'validation'.")
        if self.query is not None and self.gallery is not None:
            return EvalSets(self.query, self.gallery, same_set=False)
        if self.test is None:
            raise ValueError(f"{self.name} has neither a test split nor a query/gallery pair.")
        return EvalSets(self.test, self.test, same_set=True)

    def summary(self) -> str:
        """One line per split: number of images and classes."""
        lines = [f"{self.name}:"]
        for split_name, split in self._present_splits():
            num_classes = np.unique(label_array(split)).size
            lines.append(f"  {split_name:<10} {split.num_rows:>8} images {num_classes:>7} classes")
        return "\n".join(lines)


def _check_split_schema(split: Dataset, where: str) -> None:
    """Fail early, with the split's name, if a split lacks rows or the image/label columns."""
    for column in (IMAGE_COLUMN, LABEL_COLUMN):
        if column not in split.column_names:
            raise ValueError(f"{where} has no {column!r} column (columns: {split.column_names}).")
    if split.num_rows == 0:
        raise ValueError(f"{where} is empty; check the data source and the class split.")
    label_array(split)  # raises a clear error on non-integer labels
