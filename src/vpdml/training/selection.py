"""Which splits a run evaluates during training, and which one selects the checkpoint."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from vpdml.data import (
    DMLSplits,
    EvalSets,
)
from vpdml.training.args import TrainingArguments

# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def available_eval_sets(splits: DMLSplits) -> dict[str, EvalSets]:
    sets = {}
    if splits.validation is not None:
        sets["validation"] = splits.eval_sets("validation")
    if splits.test is not None or splits.query is not None:
        sets["test"] = splits.eval_sets("test")
    return sets


def selection_split(args: TrainingArguments, eval_sets: Mapping[str, EvalSets]) -> str | None:
    if args.select_on == "none":
        return None
    if args.select_on == "auto":
        return "validation" if "validation" in eval_sets else None
    if args.select_on not in eval_sets:
        raise ValueError(
            f"select_on={args.select_on!r} but the data has no {args.select_on} split. Load it with "
            "load_dml_dataset(..., validation_classes=...) for a validation split, or use select_on='none'."
        )
    if args.select_on == "test":
        warnings.warn(
            "Selecting the checkpoint on the test split: the test numbers will be optimistic. Prefer a "
            "validation split of held-out training classes.",
            stacklevel=3,
        )
    return args.select_on


def monitor_split(selection: str | None, eval_sets: Mapping[str, EvalSets]) -> str | None:
    """Split evaluated during training: the selection split, else validation (curves only, never test)."""
    if selection is not None:
        return selection
    return "validation" if "validation" in eval_sets else None


def metric_row(step: int, epoch: float, split: str, metrics: Mapping[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "epoch": round(epoch, 4)}
    row.update({f"{split}/{name}": value for name, value in metrics.items() if name != "num_queries"})
    return row
