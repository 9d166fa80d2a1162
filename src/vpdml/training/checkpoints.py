"""Training checkpoints as safetensors + JSON (never pickle), written atomically, resumed exactly.

A checkpoint is a folder ``<output_dir>/checkpoints/step-N/`` holding

* the model: ``save_pretrained`` files (adapter, or the full model for full fine-tuning) and, for adapters,
  ``vpdml_training_state.safetensors`` (proxies, class prompts, GRU, semantic-proxy state);
* ``optimizer.safetensors`` (every tensor of the optimizer state, keyed ``state/<param index>/<name>``) and
  ``optimizer.json`` (parameter groups, non-tensor state, the mixed-precision grad scaler);
* ``scheduler.json`` (the learning-rate scheduler's ``state_dict``);
* ``rng_state_<rank>.safetensors`` / ``.json`` per process (torch CPU and CUDA generators, numpy, ``random``);
* ``trainer_state.json`` (step, epoch, position in the epoch, best metric, history), written last.

Folders are written as ``step-N.tmp`` and renamed when complete, so a crash never leaves a ``step-N`` that looks
finished but is not; leftover ``.tmp`` folders are ignored (and cleared) on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpdml.atomic_io import atomic_save_safetensors, atomic_write_json, load_safetensors_file
from vpdml.models.protocol import as_dml_model

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "TRAINER_STATE_FILE",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "load_optimizer_state",
    "load_rng_state",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "replace_directory",
    "resolve_checkpoint",
    "save_model_weights",
    "save_optimizer_state",
    "save_rng_state",
]

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OPTIMIZER_FORMAT = "vpdml-optimizer/1"


# --------------------------------------------------------------------------------------------------
# Small atomic-write helpers
# --------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the checkpoint folder is incomplete.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {error}") from error


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing an older ``target``.

    A rename is atomic, but POSIX cannot rename a folder over a non-empty one: an existing ``target`` is first
    renamed aside (``<target>.old``) and deleted after the swap, so ``target`` is never half-written.
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------------------


def save_model_weights(model: nn.Module, directory: Path, *, with_training_state: bool = True) -> None:
    """``save_pretrained`` (+ the adapter's training-only state) into ``directory``."""
    as_dml_model(model).save(directory, with_training_state=with_training_state)


def load_model_weights(model: nn.Module, directory: Path, *, with_training_state: bool = True) -> None:
    """Load what :func:`save_model_weights` wrote into ``model``, in place, checking that every key matched."""
    as_dml_model(model).load(directory, with_training_state=with_training_state)


# --------------------------------------------------------------------------------------------------
# Optimizer and scheduler
# --------------------------------------------------------------------------------------------------


def optimizer_state_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready rest.

    Tensors are keyed ``state/<param index>/<name>`` (e.g. ``state/3/exp_avg``); everything else (parameter
    groups, non-tensor per-parameter values such as a ``None`` momentum buffer) goes to the JSON part.
    """
    tensors: dict[str, torch.Tensor] = {}
    other_state: dict[str, dict[str, Any]] = {}
    for param_id, values in state_dict["state"].items():
        extras = {}
        for name, value in values.items():
            if "/" in str(name):
                raise ValueError(
                    f"Optimizer state name {name!r} contains '/', which the key format reserves."
                )
            if isinstance(value, torch.Tensor):
                # clone: safetensors refuses tensors that share memory, and the copy must not change under us
                tensors[f"state/{param_id}/{name}"] = value.detach().cpu().clone().contiguous()
            else:
                extras[name] = value
        other_state[str(param_id)] = extras
    rest = {"format": _OPTIMIZER_FORMAT, "state": other_state, "param_groups": state_dict["param_groups"]}
    _check_json_safe(rest, "optimizer state")
    return tensors, rest


def optimizer_state_from_tensors(
    tensors: dict[str, torch.Tensor], rest: dict[str, Any], current_param_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_tensors`; tuple-valued group options (``betas``) become tuples again,
    matching the types of the optimizer they are loaded into."""
    if rest.get("format") != _OPTIMIZER_FORMAT:
        raise ValueError(
            f"Unknown optimizer state format {rest.get('format')!r} (expected {_OPTIMIZER_FORMAT})."
        )
    state: dict[int, dict[str, Any]] = {int(pid): dict(extras) for pid, extras in rest["state"].items()}
    for key, tensor in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = tensor
    groups = []
    if len(rest["param_groups"]) != len(current_param_groups):
        raise ValueError(
            f"The saved optimizer has {len(rest['param_groups'])} parameter groups, this one "
            f"{len(current_param_groups)}: the checkpoint was made with other training settings."
        )
    for saved, current in zip(rest["param_groups"], current_param_groups, strict=True):
        group = dict(saved)
        for key, value in group.items():
            if isinstance(current.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_optimizer_state(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    directory: Path,
    *,
    scaler: Any | None = None,
) -> None:
    """Write optimizer (safetensors + JSON), scheduler (JSON) and grad-scaler (JSON) state into ``directory``."""
    tensors, rest = optimizer_state_to_tensors(optimizer.state_dict())
    if scaler is not None:
        rest["grad_scaler"] = scaler.state_dict()
    atomic_save_safetensors(tensors, directory / OPTIMIZER_TENSORS_FILE, {"format": _OPTIMIZER_FORMAT})
    atomic_write_json(directory / OPTIMIZER_JSON_FILE, rest)
    scheduler_state = scheduler.state_dict()
    _check_json_safe(scheduler_state, "scheduler state")
    atomic_write_json(directory / SCHEDULER_FILE, scheduler_state)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    directory: Path,
    *,
    scaler: Any | None = None,
) -> None:
    """Restore what :func:`save_optimizer_state` wrote (``weights_only`` formats only: no unpickling)."""
    rest = read_json(directory / OPTIMIZER_JSON_FILE)
    tensors = load_safetensors_file(directory / OPTIMIZER_TENSORS_FILE)
    optimizer.load_state_dict(optimizer_state_from_tensors(tensors, rest, optimizer.param_groups))
    scheduler.load_state_dict(read_json(directory / SCHEDULER_FILE))
    if scaler is not None and "grad_scaler" in rest:
        scaler.load_state_dict(rest["grad_scaler"])


def _check_json_safe(payload: Any, what: str) -> None:
    try:
        json.dumps(payload)
    except TypeError as error:
        raise TypeError(
            f"The {what} holds a value JSON cannot store ({error}); vpdml checkpoints avoid pickle. Use a "
            "torch optimizer / scheduler whose state is tensors and plain numbers."
        ) from error


# --------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------


def save_rng_state(directory: Path, rank: int) -> None:
    """Save this process's torch (CPU and CUDA), numpy and ``random`` generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    rest = {
        "numpy": {"kind": kind, "pos": int(position), "has_gauss": int(has_gauss), "cached": cached_gaussian},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    atomic_save_safetensors(tensors, directory / f"rng_state_{rank}.safetensors", {"format": "vpdml-rng/1"})
    atomic_write_json(directory / f"rng_state_{rank}.json", rest)


def load_rng_state(directory: Path, rank: int) -> None:
    """Restore the generator states :func:`save_rng_state` wrote for ``rank`` (rank 0's when resuming on more
    processes than were saved)."""
    if not (directory / f"rng_state_{rank}.json").is_file():
        rank = 0
    tensors = load_safetensors_file(directory / f"rng_state_{rank}.safetensors")
    rest = read_json(directory / f"rng_state_{rank}.json")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    numpy_state = rest["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy_state["kind"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
    )
    python_state = rest["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (``step-N`` folders holding ``trainer_state.json``), by step.

    ``step-N.tmp`` folders (a save that did not finish) and anything else are ignored.
    """
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(value: str | os.PathLike | None, output_dir: Path) -> Path | None:
    """Turn ``resume_from_checkpoint`` into a folder: ``None``, ``"latest"`` (the newest complete checkpoint in
    ``output_dir/checkpoints``, or None when there is none yet), or a checkpoint folder."""
    if value is None:
        return None
    if str(value) == "latest":
        return latest_checkpoint(output_dir / CHECKPOINTS_DIRNAME)
    path = Path(value)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={str(value)!r} is not a complete checkpoint (no {TRAINER_STATE_FILE}). "
            f"Pass a folder like {output_dir / CHECKPOINTS_DIRNAME / 'step-100'}, or 'latest'."
        )
    return path


def remove_stale_temporaries(root: Path) -> None:
    """Delete ``*.tmp`` / ``*.old`` folders left by an interrupted save (they are never resumed from)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.is_dir() and child.name.endswith((".tmp", ".old")):
            shutil.rmtree(child, ignore_errors=True)


def rotate_checkpoints(root: Path, keep: int | None, protect: Iterable[Path] = ()) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``None`` or 0 keeps all)."""
    if not keep:
        return
    protected = {path.resolve() for path in protect}
    for _, path in list_checkpoints(root)[:-keep]:
        if path.resolve() not in protected:
            shutil.rmtree(path, ignore_errors=True)
