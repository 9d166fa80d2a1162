"""Training-only adapter state (proxies, class prompts, GRU/EMA, semantic-proxy state) as safetensors.

``save_pretrained`` writes what inference needs; this file holds the rest, so a run resumes exactly. Writes are
atomic (temporary file + rename) and loads validate every key, shape and dtype before touching the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vpdml.atomic_io import atomic_save_safetensors

TRAINING_STATE_FILE = "vpdml_training_state.safetensors"
_FORMAT = "vpdml-training-state/1"


def training_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Parameters and buffers of an adapter's training-only part, keyed without the adapter name."""
    adapter = model.resolve_adapter(adapter_name)
    if adapter not in model.dml_proxies:
        return {}
    return {key: value.detach() for key, value in model.dml_proxies[adapter].state_dict().items()}


def save_training_state(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None
) -> Path:
    """Save the training-only state of an adapter next to its ``save_pretrained`` files."""
    adapter = model.resolve_adapter(adapter_name)
    path = Path(directory) / TRAINING_STATE_FILE
    config = model.peft_config[adapter]
    metadata = {
        "format": _FORMAT,
        "num_classes": json.dumps(config.num_classes),
        "semantic_proxies": config.semantic_proxies,
        "class_prompt_storage": config.class_prompt_storage,
    }
    atomic_save_safetensors(training_state_dict(model, adapter), path, metadata)
    return path


def load_training_state(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None
) -> None:
    """Load what :func:`save_training_state` wrote; every key, shape and dtype is checked first."""
    adapter = model.resolve_adapter(adapter_name)
    path = Path(directory) / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No training state at {path}: it is written by vpdml.save_training_state().")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or tampered?): {error}"
        ) from error
    expected = training_state_dict(model, adapter)
    loaded = _with_keys_added_since(loaded, expected)
    _check_same_layout(expected, loaded, path)
    if expected:
        model.dml_proxies[adapter].load_state_dict(loaded, strict=True)


def _with_keys_added_since(
    loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fill the entries that files written by earlier vpdml versions lack: ``semantic_seen`` (0.1.0 had no such
    flag and mixed every class's state as it was: every row counts as seen, which keeps that behaviour)."""
    if "semantic_seen" in expected and "semantic_seen" not in loaded and "semantic_state" in loaded:
        loaded = {**loaded, "semantic_seen": torch.ones_like(expected["semantic_seen"])}
    return loaded


def _check_same_layout(
    expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], path: Path
) -> None:
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this adapter's training state (missing {missing}, unexpected {unexpected}). "
            "Was it saved for an adapter with another config (semantic_proxies, num_classes, or class_prompt_storage: "
            "'dense' and 'sparse' tables share their layout, 'low_rank' has its own)?"
        )
    for key, tensor in expected.items():
        other = loaded[key]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise ValueError(
                f"{path}: {key} is {tuple(other.shape)} {other.dtype}, this adapter expects {tuple(tensor.shape)} "
                f"{tensor.dtype} (num_classes or embedding_dim differ?)."
            )
