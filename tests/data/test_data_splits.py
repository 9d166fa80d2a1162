"""Class-disjoint splits, label remapping and validation hold-out."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from vpdml.data.splits import (
    DMLSplits,
    class_disjoint_halves,
    count_singleton_classes,
    hold_out_validation,
    label_array,
    remap_labels,
    split_by_class,
    split_classes,
)


def make_dataset(labels: list[int], *, class_names: list[str] | None = None) -> Dataset:
    """Tiny in-memory image dataset; each image's red value encodes its row, to track rows across splits."""
    images = [Image.new("RGB", (4, 4), (row, 0, 0)) for row in range(len(labels))]
    label_feature = ClassLabel(names=class_names) if class_names else Value("int64")
    features = Features({"image": ImageFeature(), "label": label_feature})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def red_values(dataset: Dataset) -> list[int]:
    return [row["image"].getpixel((0, 0))[0] for row in dataset]


# 10 classes (ids 10..19, deliberately not 0-based), 3 images each, rows interleaved.
LABELS = [10 + (row % 10) for row in range(30)]


def test_remap_labels_makes_contiguous_labels_and_keeps_originals() -> None:
    remapped = remap_labels(make_dataset([7, 3, 7, 42]))
    assert remapped["label"][:] == [1, 0, 1, 2]
    assert remapped["original_label"][:] == [7, 3, 7, 42]


def test_second_remap_keeps_the_source_labels() -> None:
    first = remap_labels(make_dataset([7, 3, 7, 42]))
    second = remap_labels(first.select([0, 3]))
    assert second["label"][:] == [0, 1]
    assert second["original_label"][:] == [7, 42]


def test_split_by_class_is_class_disjoint_and_keeps_the_right_rows() -> None:
    train, test = split_by_class(make_dataset(LABELS), range(10, 15), range(15, 20))
    assert set(train["original_label"][:]) == set(range(10, 15))
    assert set(test["original_label"][:]) == set(range(15, 20))
    assert sorted(set(train["label"][:])) == list(range(5))
    assert sorted(set(test["label"][:])) == list(range(5))
    # the image of each row travels with its label
    assert all(
        LABELS[red] == original
        for red, original in zip(red_values(train), train["original_label"][:], strict=True)
    )


def test_split_classes_makes_several_parts_without_copying_images() -> None:
    dataset = make_dataset(LABELS)
    parts = split_classes(dataset, {"train": [10, 11, 12], "validation": [13], "test": range(17, 20)})
    assert {name: set(part["original_label"][:]) for name, part in parts.items()} == {
        "train": {10, 11, 12},
        "validation": {13},
        "test": {17, 18, 19},
    }
    assert parts["validation"]["label"][:] == [0, 0, 0]
    # every part is a row selection over one relabelled table (images stored once)
    assert all(part.data.num_rows == dataset.num_rows for part in parts.values())


def test_original_label_keeps_class_names() -> None:
    names = [f"bird_{i}" for i in range(20)]
    train, _ = split_by_class(make_dataset(LABELS, class_names=names), range(10, 15), range(15, 20))
    assert train.features["original_label"].int2str(train[0]["original_label"]) == f"bird_{LABELS[0]}"


def test_split_by_class_rejects_overlap_and_unknown_classes() -> None:
    dataset = make_dataset(LABELS)
    with pytest.raises(ValueError, match="disjoint"):
        split_by_class(dataset, [10, 11], [11, 12])
    with pytest.raises(ValueError, match="1 test classes do not occur"):
        split_by_class(dataset, [10], [99])
    with pytest.raises(ValueError, match="'test' class group is empty"):
        split_by_class(dataset, [10], [])


def test_class_disjoint_halves_without_seed_uses_sorted_class_order() -> None:
    train, test = class_disjoint_halves(make_dataset(LABELS))
    assert set(train["original_label"][:]) == set(range(10, 15))
    assert set(test["original_label"][:]) == set(range(15, 20))


def test_class_disjoint_halves_with_seed_is_deterministic_and_disjoint() -> None:
    dataset = make_dataset(LABELS)
    train_a, test_a = class_disjoint_halves(dataset, seed=3, train_fraction=0.3)
    train_b, _ = class_disjoint_halves(dataset, seed=3, train_fraction=0.3)
    train_classes, test_classes = set(train_a["original_label"][:]), set(test_a["original_label"][:])
    assert len(train_classes) == 3 and len(test_classes) == 7
    assert not train_classes & test_classes
    assert train_classes == set(train_b["original_label"][:])


def test_hold_out_validation_takes_training_classes_only() -> None:
    train, test = split_by_class(make_dataset(LABELS), range(10, 16), range(16, 20))
    kept, validation = hold_out_validation(train, 2, seed=0)
    kept_classes, validation_classes = set(kept["original_label"][:]), set(validation["original_label"][:])
    assert len(validation_classes) == 2
    assert validation_classes <= set(range(10, 16))  # never test classes
    assert not validation_classes & set(test["original_label"][:])
    assert kept_classes | validation_classes == set(range(10, 16))
    assert not kept_classes & validation_classes
    assert sorted(set(kept["label"][:])) == [0, 1, 2, 3]  # re-remapped, still contiguous


def test_hold_out_validation_accepts_a_fraction_and_rejects_bad_amounts() -> None:
    train = remap_labels(make_dataset(LABELS))
    _, validation = hold_out_validation(train, 0.2, seed=1)
    assert len(set(validation["label"][:])) == 2
    for bad in (0, 10, 1.0, -0.5):
        with pytest.raises(ValueError):
            hold_out_validation(train, bad)


def test_label_array_rejects_missing_and_non_integer_labels() -> None:
    strings = Dataset.from_dict({"image": ["a.jpg"], "label": ["cat"]})
    with pytest.raises(TypeError, match="class_encode_column"):
        label_array(strings)
    with pytest.raises(KeyError, match="no label column 'target'"):
        label_array(strings, "target")


def test_count_singleton_classes() -> None:
    assert count_singleton_classes(make_dataset([0, 0, 1, 2, 2, 3])) == 2


def test_dml_splits_eval_sets_and_class_count() -> None:
    train, test = class_disjoint_halves(make_dataset(LABELS))
    splits = DMLSplits(name="toy", train=train, test=test)
    assert splits.num_train_classes == 5
    query, gallery, same_set = splits.eval_sets("test")
    assert query is test and gallery is test and same_set
    with pytest.raises(ValueError, match="validation_classes"):
        splits.eval_sets("validation")
    assert "train" in splits.summary() and "15 images" in splits.summary()


def test_dml_splits_with_query_and_gallery_evaluates_across_sets() -> None:
    train, test = class_disjoint_halves(make_dataset(LABELS))
    splits = DMLSplits(name="shop", train=train, query=test.select([0, 1]), gallery=test)
    query, gallery, same_set = splits.eval_sets()
    assert query.num_rows == 2 and gallery is test and not same_set


def test_dml_splits_rejects_non_contiguous_train_labels_and_empty_splits() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        DMLSplits(name="bad", train=make_dataset([0, 2, 2]))
    empty = make_dataset([0]).select([])
    with pytest.raises(ValueError, match="bad/test is empty"):
        DMLSplits(name="bad", train=make_dataset([0, 1]), test=empty)


def test_label_array_is_int64_numpy() -> None:
    labels = label_array(make_dataset([3, 1]).select([1, 0]))
    assert labels.dtype == np.int64 and labels.tolist() == [1, 3]
