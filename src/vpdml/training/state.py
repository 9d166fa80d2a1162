"""Where a run stands (saved in every checkpoint) and what it produced."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainResult", "TrainerState"]


# --------------------------------------------------------------------------------------------------
# State and results
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint and passed to ``step_callback``."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next batch comes from
    batch_in_epoch: int = 0  # batches of that epoch already used
    micro_step: int = 0  # batches used in total (forward passes)
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    zero_shot_metrics: dict[str, dict[str, float]] | None = None
    # training loss summed over the batches since the last log row (saved so a resumed run logs the same rows)
    loss_since_log: float = 0.0
    batches_since_log: int = 0
    head_warmup_losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in names})


@dataclass
class TrainResult:
    """What :func:`train` produced.

    ``metrics`` is ``{"zero_shot": {split: metrics}, "trained": {split: metrics}}``; ``history`` the logged rows
    (training rows: ``step``, ``epoch``, ``loss``, ``lr``; evaluation rows: ``step``, ``epoch``,
    ``<split>/<metric>``); ``files`` the paths written to ``output_dir`` by name.
    """

    output_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]
    global_step: int
    selected_on: str | None
    best_step: int | None
    best_metric: float | None
    best_checkpoint: Path | None
    history: list[dict[str, Any]]
    files: dict[str, Path]
    hub_url: str | None = None
