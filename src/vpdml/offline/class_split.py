"""The seeded class split shared by the offline benchmarks: a training half and a test half of the classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------------
# Class-disjoint splits
# --------------------------------------------------------------------------------------------------


def split_emoji_classes(
    num_classes: int,
    seed: int = 0,
    num_train_classes: int | None = None,
    num_test_classes: int | None = None,
    validation_classes: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Class ids for ``(train, validation, test)``: a seeded shuffle cut in halves.

    The first half is the training pool, from which ``validation_classes`` are held out first; the
    second half is the test pool. Subsetting takes a prefix of each pool, so a smaller demo split is a
    subset of the larger one with the same seed, and validation never depends on ``num_train_classes``.
    """
    for name, value in (("num_train_classes", num_train_classes), ("num_test_classes", num_test_classes)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of classes or None, got {value}.")
    if validation_classes < 0:
        raise ValueError(f"validation_classes must be >= 0, got {validation_classes}.")
    order = np.random.default_rng(seed).permutation(num_classes)
    train_pool, test_pool = order[: num_classes // 2], order[num_classes // 2 :]
    validation, train_pool = train_pool[:validation_classes], train_pool[validation_classes:]
    train = train_pool[:num_train_classes] if num_train_classes is not None else train_pool
    test = test_pool[:num_test_classes] if num_test_classes is not None else test_pool
    _check_enough(
        "train", num_train_classes, train_pool.size, f"after {validation_classes} validation classes"
    )
    _check_enough("test", num_test_classes, test_pool.size, "in the test half")
    if train.size == 0:
        raise ValueError(
            f"validation_classes={validation_classes} leaves no training class of {num_classes // 2}."
        )
    return train.tolist(), validation.tolist(), test.tolist()


def _check_enough(split: str, requested: int | None, available: int, where: str) -> None:
    if requested is not None and requested > available:
        raise ValueError(f"Asked for {requested} {split} classes but only {available} are available {where}.")
