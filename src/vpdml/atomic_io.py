"""Atomic file writes: a reader (or a resumed run after a crash) never sees half a file.

Every writer goes through :func:`atomic_write_bytes`: a temporary file in the same folder, fsync, then an atomic
rename over the target. Permissions follow the umask (``mkstemp`` alone would leave files at 0600).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes


@functools.cache
def _umask() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it: done once, and put back at once
    os.umask(umask)
    return umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Save tensors (moved to CPU, made contiguous) as a safetensors file, atomically."""
    cpu = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(cpu, metadata=metadata))


def load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, naming it in the error when it is missing or unreadable (truncated, tampered)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the folder is incomplete.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated?): {error}") from error
