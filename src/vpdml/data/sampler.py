"""Class-balanced batch sampling (P classes x m images per batch), deterministic and resumable.

Pass :class:`ClassBalancedBatchSampler` as ``batch_sampler=`` to a ``DataLoader``. docs/training.md
("Class-balanced batches") says how an epoch is built, how it shards over processes with accelerate, and how it
resumes exactly.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

LabelsLike = Sequence[int] | np.ndarray | torch.Tensor


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield batches of ``classes_per_batch`` (P) classes x ``samples_per_class`` (m) dataset indices.

    Args:
        labels: one integer label per dataset row (any order, any values; need not be contiguous).
        classes_per_batch: P, distinct classes per global batch. Give this or ``batch_size``.
        samples_per_class: m, images per class in a batch.
        batch_size: the global batch size P x m, as an alternative to ``classes_per_batch``.
        seed: base seed; batches are a pure function of ``(seed, epoch)``. Same on all ranks.
        drop_last: epochs have ``N // (P*m)`` batches (True) or ``ceil(N / (P*m))`` (False). Batches
            are always full either way.
        num_replicas, rank: yield only this rank's share (``P/R`` whole classes) of each global batch.
            See the module docstring before combining this with accelerate.
    """

    def __init__(
        self,
        labels: LabelsLike,
        classes_per_batch: int | None = None,
        samples_per_class: int = 2,
        *,
        batch_size: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.labels = _as_label_array(labels)
        self.samples_per_class = _positive_int(samples_per_class, "samples_per_class")
        self.classes_per_batch = _resolve_classes_per_batch(classes_per_batch, batch_size, samples_per_class)
        self.num_replicas = _positive_int(num_replicas, "num_replicas")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        if self.classes_per_batch % num_replicas:
            raise ValueError(
                f"classes_per_batch ({self.classes_per_batch}) must be divisible by num_replicas "
                f"({num_replicas}) so that every rank gets whole classes."
            )
        self.rank = rank
        self.seed = int(seed)
        self.drop_last = drop_last

        self.class_ids, class_of_row = np.unique(self.labels, return_inverse=True)
        if self.class_ids.size < self.classes_per_batch:
            raise ValueError(
                f"Only {self.class_ids.size} classes in the labels, but classes_per_batch is "
                f"{self.classes_per_batch}: lower classes_per_batch (or raise samples_per_class)."
            )
        # Rows of each class, in dataset order (stable sort keeps the plan independent of label values).
        order = np.argsort(class_of_row, kind="stable")
        bounds = np.cumsum(np.bincount(class_of_row, minlength=self.class_ids.size))[:-1]
        self._rows_of_class: list[np.ndarray] = np.split(order, bounds)
        self.num_batches = self._count_batches()
        self._labels_crc32 = zlib.crc32(self.labels.tobytes())
        self._epoch = 0
        self._batches_yielded = 0
        self._resume_pending = False
        self._warn_about_small_classes()

    @property
    def global_batch_size(self) -> int:
        """P x m: the batch all ranks together see per step."""
        return self.classes_per_batch * self.samples_per_class

    @property
    def batch_size(self) -> int:
        """Size of the batches this sampler yields (this rank's share of the global batch).

        accelerate reads this attribute (``split_batches`` needs it to be divisible by the process count).
        """
        return self.global_batch_size // self.num_replicas

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def batches_remaining(self) -> int:
        """Batches left in the current epoch (``len(self)`` minus those already yielded)."""
        return self.num_batches - self._batches_yielded

    def __len__(self) -> int:
        """Batches per (full) epoch, the same on every rank."""
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; a no-op if the sampler is already in that epoch."""
        if epoch == self._epoch:
            return
        if self._resume_pending and self._batches_yielded:
            warnings.warn(
                f"set_epoch({epoch}) discards the loaded resume point (epoch {self._epoch}, "
                f"{self._batches_yielded} batches done). With accelerate, call "
                f"prepared_loader.set_epoch({self._epoch}) after resuming.",
                stacklevel=2,
            )
        self._epoch = int(epoch)
        self._batches_yielded = 0
        self._resume_pending = False

    def __iter__(self) -> Iterator[list[int]]:
        self._roll_over_finished_epoch()
        self._resume_pending = False
        epoch, start = self._epoch, self._batches_yielded
        plan = self.global_batches(epoch)
        for batch_number in range(start, self.num_batches):
            if self._epoch != epoch:  # set_epoch was called mid-iteration: stop this stale stream
                return
            self._batches_yielded = batch_number + 1
            yield self._rank_share(plan[batch_number])
        self._roll_over_finished_epoch()

    def global_batches(self, epoch: int) -> np.ndarray:
        """All global batches of ``epoch``: an int64 array ``(num_batches, P, m)`` of dataset indices."""
        rng = np.random.default_rng([self.seed, epoch])
        decks = _ClassDecks(self._rows_of_class, self.samples_per_class, rng)
        plan = np.empty((self.num_batches, self.classes_per_batch, self.samples_per_class), dtype=np.int64)
        for batch_number in range(self.num_batches):
            for slot, class_index in enumerate(decks.pick_classes(self.classes_per_batch)):
                plan[batch_number, slot] = decks.deal(class_index)
        return plan

    def state_dict(self) -> dict[str, Any]:
        """Epoch and global batches yielded so far, plus what identifies this sampler's batch stream."""
        self._roll_over_finished_epoch()
        return {"epoch": self._epoch, "batches_yielded": self._batches_yielded, **self._stream_identity()}

    def _stream_identity(self) -> dict[str, int]:
        """What must match for a saved state to describe this sampler's batches."""
        return {
            "seed": self.seed,
            "classes_per_batch": self.classes_per_batch,
            "samples_per_class": self.samples_per_class,
            "num_batches": self.num_batches,
            "labels_crc32": self._labels_crc32,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``: the next ``__iter__`` yields the remaining batches of its epoch.

        Raises ValueError if the state came from a sampler with other labels, seed or batch layout
        (its batches would not be the ones the saved run was going to see).
        """
        identity = self._stream_identity()
        mismatched = [key for key, value in identity.items() if key in state and state[key] != value]
        if mismatched:
            details = ", ".join(f"{key}: saved {state[key]} vs now {identity[key]}" for key in mismatched)
            raise ValueError(f"Sampler state does not match this sampler ({details}).")
        self.set_resume_point(int(state["epoch"]), int(state["batches_yielded"]))

    def set_resume_point(self, epoch: int, batches_done: int) -> None:
        """Resume after ``batches_done`` global batches of ``epoch`` (e.g. from the trainer's step count)."""
        if not 0 <= batches_done <= self.num_batches:
            raise ValueError(f"batches_done must be in [0, {self.num_batches}], got {batches_done}.")
        self._epoch = int(epoch)
        self._batches_yielded = int(batches_done)
        self._resume_pending = True
        self._roll_over_finished_epoch()

    def _roll_over_finished_epoch(self) -> None:
        """A fully yielded epoch means the stream is at the start of the next one."""
        if self._batches_yielded >= self.num_batches:
            self._epoch += 1
            self._batches_yielded = 0
            self._resume_pending = False

    def _rank_share(self, global_batch: np.ndarray) -> list[int]:
        """This rank's contiguous block of whole classes, flattened class by class."""
        classes_per_rank = self.classes_per_batch // self.num_replicas
        block = global_batch[self.rank * classes_per_rank : (self.rank + 1) * classes_per_rank]
        return block.reshape(-1).tolist()

    def _count_batches(self) -> int:
        num_rows = self.labels.size
        batches = (
            num_rows // self.global_batch_size
            if self.drop_last
            else math.ceil(num_rows / self.global_batch_size)
        )
        if batches == 0:
            raise ValueError(
                f"{num_rows} images make no full batch of {self.global_batch_size} "
                f"(P={self.classes_per_batch} x m={self.samples_per_class}) with drop_last=True: "
                "use a smaller batch or drop_last=False."
            )
        return batches

    def _warn_about_small_classes(self) -> None:
        sizes = np.array([rows.size for rows in self._rows_of_class])
        small = int((sizes < self.samples_per_class).sum())
        if small and self.rank == 0:
            warnings.warn(
                f"{small} of {sizes.size} classes have fewer than samples_per_class={self.samples_per_class} "
                "images: their batch slots are topped up by repeating images.",
                stacklevel=3,
            )


class _ClassDecks:
    """Per-class shuffled decks of row indices, dealt out ``m`` at a time (one epoch's bookkeeping)."""

    def __init__(self, rows_of_class: list[np.ndarray], samples_per_class: int, rng: np.random.Generator):
        self.rows_of_class = rows_of_class
        self.m = samples_per_class
        self.rng = rng
        self.decks = [rng.permutation(rows) for rows in rows_of_class]
        self.positions = np.zeros(len(rows_of_class), dtype=np.int64)
        self.sizes = np.array([rows.size for rows in rows_of_class], dtype=np.int64)
        self.chunks_left = self._chunks_in_full_deck()

    def _chunks_in_full_deck(self) -> np.ndarray:
        return -(-self.sizes // self.m)  # ceil division

    def pick_classes(self, count: int) -> np.ndarray:
        """``count`` distinct classes, drawn without replacement with weights = chunks left.

        Uses Gumbel top-k (weighted sampling without replacement in one vectorised step); classes with
        nothing left are excluded, and all exhausted decks are reshuffled once too few remain.
        """
        if int((self.chunks_left > 0).sum()) < count:
            self._reshuffle_exhausted_decks()
        with np.errstate(divide="ignore"):
            keys = np.log(self.chunks_left) + self.rng.gumbel(size=self.chunks_left.size)
        chosen = np.argpartition(-keys, count - 1)[:count]
        return chosen[np.argsort(-keys[chosen], kind="stable")]

    def deal(self, class_index: int) -> np.ndarray:
        """The next ``m`` rows of a class, completing a short deck from a new shuffle without repeats."""
        deck, position, size = self.decks[class_index], self.positions[class_index], self.sizes[class_index]
        self.chunks_left[class_index] -= 1
        if size < self.m:  # top up: every image once, then random repeats
            self.positions[class_index] = size
            return np.concatenate([deck, self.rng.choice(deck, size=self.m - size, replace=True)])
        chunk = deck[position : position + self.m]
        self.positions[class_index] = min(position + self.m, size)
        if chunk.size < self.m:
            unused = np.setdiff1d(self.rows_of_class[class_index], chunk, assume_unique=True)
            chunk = np.concatenate([chunk, self.rng.choice(unused, size=self.m - chunk.size, replace=False)])
        return chunk

    def _reshuffle_exhausted_decks(self) -> None:
        exhausted = np.flatnonzero(self.chunks_left == 0)
        for class_index in exhausted:
            self.decks[class_index] = self.rng.permutation(self.rows_of_class[class_index])
        self.positions[exhausted] = 0
        self.chunks_left[exhausted] = self._chunks_in_full_deck()[exhausted]


def _as_label_array(labels: LabelsLike) -> np.ndarray:
    """Labels as a 1-D int64 array, with a clear error for anything else."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {array.shape}.")
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"labels must be integers, got dtype {array.dtype}; map class names to ints first "
            "(e.g. datasets' class_encode_column)."
        )
    return array.astype(np.int64, copy=False)


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _resolve_classes_per_batch(
    classes_per_batch: int | None, batch_size: int | None, samples_per_class: int
) -> int:
    """P from either P itself or the batch size P x m (exactly one of them, or both consistent)."""
    if batch_size is None:
        if classes_per_batch is None:
            raise ValueError("Give classes_per_batch (P) or batch_size (P x samples_per_class).")
        return _positive_int(classes_per_batch, "classes_per_batch")
    batch_size = _positive_int(batch_size, "batch_size")
    if batch_size % samples_per_class:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of samples_per_class ({samples_per_class})."
        )
    if classes_per_batch is not None and classes_per_batch * samples_per_class != batch_size:
        raise ValueError(
            f"classes_per_batch ({classes_per_batch}) x samples_per_class ({samples_per_class}) "
            f"!= batch_size ({batch_size}); give only one of them."
        )
    return batch_size // samples_per_class
