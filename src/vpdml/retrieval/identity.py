"""Which adapter produced an embedding: a content digest that indexes and queries are checked against."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpdml.models.protocol import as_dml_model

__all__ = ["AdapterIdentity", "AdapterMismatchError"]
# Config fields that do not change what the adapter computes (where it was loaded from, PEFT bookkeeping).
_VOLATILE_CONFIG_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "task_type"}
)


class AdapterMismatchError(ValueError):
    """Query embeddings come from another adapter than the index's: their similarities mean nothing."""


# --------------------------------------------------------------------------------------------------
# Adapter identity
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterIdentity:
    """Which adapter made some embeddings.

    ``sha256`` decides: it is a digest of the adapter's tensors (what ``adapter_model.safetensors`` holds) and of
    its config (``adapter_config.json`` without the fields that only say where it was loaded from). The same
    adapter gives the same digest whether it is in memory, in a folder, or downloaded from the Hub. ``name``
    (folder, Hub repo id or PEFT adapter name), ``revision`` (Hub commit) and ``backbone`` are for people.
    """

    sha256: str
    name: str | None = None
    revision: str | None = None
    backbone: str | None = None

    @classmethod
    def of_model(
        cls,
        model: nn.Module,
        adapter_name: str | None = None,
        *,
        name: str | None = None,
        revision: str | None = None,
        backbone: str | None = None,
    ) -> AdapterIdentity:
        """Identity of a PEFT model's adapter (default: the active one) or of a :class:`vpdml.FullFineTuningDML`."""
        dml = as_dml_model(model)
        tensors, config = dml.identity_content(adapter_name)
        if dml.is_adapter:
            backbone = backbone or config.get("base_model_name_or_path")
            name = name or adapter_name or model.active_adapter
            revision = revision or config.get("revision")
        return cls(_digest(tensors, config), name=name, revision=revision, backbone=backbone)

    @classmethod
    def of_adapter_dir(
        cls,
        directory: str | os.PathLike,
        *,
        name: str | None = None,
        revision: str | None = None,
        backbone: str | None = None,
    ) -> AdapterIdentity:
        """Identity of a saved adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
        for path in (weights, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{directory} holds no {path.name}: not a saved (safetensors) adapter."
                )
        config = json.loads(config_path.read_text())
        return cls(
            _digest(load_file(str(weights)), config),
            name=name or str(directory),
            revision=revision,
            backbone=backbone or config.get("base_model_name_or_path"),
        )

    def describe(self) -> str:
        parts = [self.name or "unnamed adapter"]
        if self.revision:
            parts.append(f"revision {self.revision}")
        parts.append(f"sha256 {self.sha256[:12]}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterIdentity:
        sha = values.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ValueError(f"adapter identity without a valid sha256: {dict(values)!r}")
        return cls(sha, values.get("name"), values.get("revision"), values.get("backbone"))


def _digest(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """SHA-256 over the tensors (sorted by key: name, dtype, shape, bytes) and the canonical JSON config."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    stable = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(stable, sort_keys=True, default=str).encode())
    return digest.hexdigest()
