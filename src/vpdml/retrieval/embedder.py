"""``ImageEmbedder``: a trained adapter (or full fine-tuning / LoRA folder) as an image -> embedding function.

::

    from vpdml import ImageEmbedder

    embedder = ImageEmbedder.from_pretrained("runs/emoji")     # folder or Hub repo id
    embeddings = embedder.encode(["a.png", "b.png"])           # (2, E) float32 numpy, L2-normalised
    embedder.similarity(embeddings, embeddings)                 # (2, 2) cosine similarities

It loads the backbone the adapter names (a Hub id, a folder, or the offline backbone's portable name), the adapter,
and the preprocessing the adapter was evaluated with (its ``preprocessor_config.json``). More adapters on the same
backbone share it: ``add_adapter(name, folder)``, then ``encode(..., adapter=name)``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from vpdml.data import EvalTransform
from vpdml.data.folders import open_query_image
from vpdml.models.protocol import as_dml_model
from vpdml.modules.loading import portable_backbone_name
from vpdml.retrieval.identity import AdapterIdentity
from vpdml.retrieval.pretrained import adapter_folder, index_source, load_for_index

__all__ = ["ImageEmbedder", "LoadedAdapter"]

DEFAULT_ADAPTER = "default"
ConvertTo = Literal["numpy", "torch"]


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter of an :class:`ImageEmbedder`: its preprocessing, identity and where it came from."""

    transform: EvalTransform
    identity: AdapterIdentity
    info: dict[str, Any]


class ImageEmbedder:
    """Embeds images with one backbone and one or more adapters; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapters: dict[str, LoadedAdapter],
        *,
        backbone: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not adapters:
            raise ValueError("An ImageEmbedder needs at least one adapter.")
        self.model = model
        self.backbone = backbone
        self.device = torch.device(device)
        self.dtype = dtype
        self._adapters = dict(adapters)
        self._default = next(iter(self._adapters))
        self._is_peft = as_dml_model(model).is_adapter

    @classmethod
    def from_pretrained(
        cls,
        repo_or_folder: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backbone: str | None = None,
        image_size: int | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> ImageEmbedder:
        """Load an adapter folder or Hub repo (or a full fine-tuning / LoRA folder) with its backbone and preprocessing.

        ``device``: default CUDA when available, else CPU. ``dtype``: the compute dtype, e.g. ``torch.bfloat16`` or
        ``"float16"`` (autocast; the weights, and the head's arithmetic, stay float32; default float32).
        ``backbone`` overrides the base model the adapter names; ``image_size`` its crop size.
        """
        _check_adapter_name(adapter_name)
        model, transform, identity, info = load_for_index(
            os.fspath(repo_or_folder), backbone, image_size, adapter_name=adapter_name
        )
        resolved_device, resolved_dtype = _resolve_device(device), _resolve_dtype(dtype)
        model.to(device=resolved_device).eval()
        return cls(
            model,
            {adapter_name: LoadedAdapter(transform, identity, info)},
            backbone=info["backbone"],
            device=resolved_device,
            dtype=resolved_dtype,
        )

    @classmethod
    def for_index(
        cls,
        index: Any,
        adapter: str | None = None,
        *,
        backbone: str | None = None,
        image_size: int | None = None,
        where: str = "the index",
        **options: Any,
    ) -> ImageEmbedder:
        """The embedder a :class:`~vpdml.retrieval.index.GalleryIndex` was built with (adapter, backbone and crop
        size from ``index.info``; the arguments override them). ``options``: as for :meth:`from_pretrained`."""
        adapter, backbone, image_size = index_source(index, adapter, backbone, image_size, where=where)
        return cls.from_pretrained(adapter, backbone=backbone, image_size=image_size, **options)

    # adapters ------------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Adapter names, the default (the one loaded by :meth:`from_pretrained`) first."""
        return list(self._adapters)

    def add_adapter(
        self, name: str, repo_or_folder: str | os.PathLike, *, image_size: int | None = None
    ) -> None:
        """Load another adapter trained on the same backbone onto this one (PEFT ``load_adapter``)."""
        _check_adapter_name(name)
        if name in self._adapters:
            raise ValueError(f"An adapter named {name!r} is loaded already (adapters: {self.adapters}).")
        if not self._is_peft:
            raise ValueError(
                "This embedder holds a full fine-tuning or LoRA model: it cannot share its backbone with adapters."
            )
        source = os.fspath(repo_or_folder)
        self._check_same_backbone(source)
        _, transform, identity, info = load_for_index(
            source, self.backbone, image_size, onto=self.model, adapter_name=name
        )
        self.model.to(device=self.device).eval()
        self._adapters[name] = LoadedAdapter(transform, identity, info)

    def _check_same_backbone(self, source: str) -> None:
        config = json.loads((adapter_folder(source) / "adapter_config.json").read_text())
        theirs, ours = config.get("base_model_name_or_path"), self.backbone
        if theirs and ours and portable_backbone_name(theirs) != portable_backbone_name(ours):
            raise ValueError(
                f"{source} was trained on {theirs}, this embedder's backbone is {ours}: load it in an ImageEmbedder "
                "of its own."
            )

    def _entry(self, adapter: str | None) -> tuple[str, LoadedAdapter]:
        name = self._default if adapter is None else adapter
        if name not in self._adapters:
            raise ValueError(f"Unknown adapter {name!r} (adapters: {self.adapters}).")
        return name, self._adapters[name]

    def transform(self, adapter: str | None = None) -> EvalTransform:
        """The preprocessing of ``adapter`` (default: the first one): PIL image -> ``(3, S, S)`` tensor."""
        return self._entry(adapter)[1].transform

    def identity(self, adapter: str | None = None) -> AdapterIdentity:
        """What a gallery index records about ``adapter`` (and checks queries against)."""
        return self._entry(adapter)[1].identity

    def info(self, adapter: str | None = None) -> dict[str, Any]:
        """``{"adapter": source, "backbone": name, "image_size": crop size}`` of ``adapter``."""
        return dict(self._entry(adapter)[1].info)

    # embedding -----------------------------------------------------------------------------------

    def encode(
        self,
        images: Any,
        batch_size: int = 64,
        show_progress_bar: bool | None = None,
        convert_to: ConvertTo = "numpy",
        adapter: str | None = None,
    ) -> np.ndarray | torch.Tensor:
        """L2-normalised float32 embeddings of ``images``, on the CPU.

        ``images``: one image or a sequence of them; an image is a PIL image, a file path, or a channels-last
        ``(H, W)`` / ``(H, W, 3)`` / ``(H, W, 4)`` array (uint8, or float in [0, 1]). A ``(N, H, W, C)`` array,
        a ``datasets`` image column or a ``datasets.Dataset`` with an ``image`` column work too. One image gives a
        ``(E,)`` vector, anything else ``(N, E)``. ``show_progress_bar=None`` shows one when the ``vpdml`` logger
        is at INFO or DEBUG. ``convert_to``: ``"numpy"`` or ``"torch"``.
        """
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        name, entry = self._entry(adapter)
        single = _is_single_image(images)
        items = [images] if single else _image_items(images)
        total = len(items) if isinstance(items, Sequence) else None
        if total == 0:
            raise ValueError("No images to encode.")
        if show_progress_bar is None:
            show_progress_bar = logging.getLogger("vpdml").getEffectiveLevel() <= logging.INFO
        pieces = []
        with tqdm(
            total=total, desc="encoding", unit="img", disable=not show_progress_bar, leave=False
        ) as bar:
            for start, chunk in _chunks(items, batch_size):
                pixels = torch.stack(
                    [entry.transform(_to_pil(item, start + offset)) for offset, item in enumerate(chunk)]
                )
                pieces.append(self._embed(pixels, name))
                bar.update(len(chunk))
        if not pieces:
            raise ValueError("No images to encode.")
        embeddings = torch.cat(pieces)
        if single:
            embeddings = embeddings[0]
        return embeddings.numpy() if convert_to == "numpy" else embeddings

    def _embed(self, pixels: torch.Tensor, adapter: str) -> torch.Tensor:
        pixels = pixels.to(device=self.device)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.no_grad(), autocast:
            if self._is_peft:
                embeddings = self.model.embed(pixels, adapter_name=adapter)
            else:
                embeddings = self.model.embed(pixels)
        return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu()

    @staticmethod
    def similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Cosine similarity matrix ``(len(a), len(b))`` of two sets of embeddings (1-D inputs count as one row).

        Numpy in, numpy out; otherwise a float32 CPU tensor.
        """
        left, right = _as_matrix(a, "a"), _as_matrix(b, "b")
        if left.shape[1] != right.shape[1]:
            raise ValueError(f"Embedding sizes differ: {left.shape[1]} (a) vs {right.shape[1]} (b).")
        normalize = torch.nn.functional.normalize
        scores = (normalize(left, dim=-1) @ normalize(right, dim=-1).T).float()
        return scores.numpy() if isinstance(a, np.ndarray) else scores

    def __repr__(self) -> str:
        return (
            f"ImageEmbedder(backbone={self.backbone!r}, adapters={self.adapters}, device={self.device}, "
            f"dtype={self.dtype})"
        )


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"An adapter name is a non-empty string without dots, got {name!r}.")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r} (e.g. 'float32', 'bfloat16', 'float16').")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}.")
    return dtype


def _is_single_image(images: Any) -> bool:
    if isinstance(images, Image.Image | str | os.PathLike | dict):
        return True
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


def _image_items(images: Any) -> Sequence[Any] | Iterable[Any]:
    """A sequence (or iterable) of single images from a batch-like input."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                f"An image array has shape (H, W), (H, W, C) or, for a batch, (N, H, W, C); got {images.shape}."
            )
        return list(images)
    column_names = getattr(images, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        if "image" not in column_names:
            raise ValueError(
                f"The dataset has no 'image' column (columns: {column_names}): pass dataset[column]."
            )
        return images["image"]
    if isinstance(images, torch.Tensor):
        raise TypeError("Pass images as PIL images, file paths or numpy arrays, not a torch tensor.")
    if isinstance(images, Iterable):
        return images if hasattr(images, "__len__") and hasattr(images, "__getitem__") else iter(images)
    raise TypeError(
        f"images must be an image (PIL, path, array) or a sequence of them, got {type(images).__name__}."
    )


def _chunks(items: Sequence[Any] | Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    iterator, start = iter(items), 0
    while chunk := list(islice(iterator, size)):
        yield start, chunk
        start += len(chunk)


def _to_pil(item: Any, position: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str | os.PathLike):
        return _open(Path(item))
    if isinstance(item, np.ndarray):
        return _array_to_pil(item)
    if isinstance(item, dict) and (
        item.get("bytes") or item.get("path")
    ):  # a datasets Image(decode=False) row
        if item.get("bytes"):
            return _open(io.BytesIO(item["bytes"]), name=item.get("path") or f"image {position}")
        return _open(Path(item["path"]))
    raise TypeError(
        f"Image {position}: expected a PIL image, a file path or a numpy array, got {type(item).__name__}."
    )


def _open(source: Path | io.BytesIO, name: str | None = None) -> Image.Image:
    label = name or str(source)
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"No such image file: {source}")
    try:
        return open_query_image(source)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read image {label}: {error.__class__.__name__}: {error}") from error


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = (
            " (channels first? pass array.transpose(1, 2, 0))"
            if array.ndim == 3 and array.shape[0] in (3, 4)
            else ""
        )
        raise ValueError(
            f"An image array is channels-last (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}{hint}."
        )
    if array.dtype == np.uint8:
        values = array
    elif array.dtype == np.bool_:
        values = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.number):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("The image array holds NaN or infinite values.")
        if (
            np.issubdtype(array.dtype, np.floating)
            and values.size
            and values.min() >= 0
            and values.max() <= 1
        ):
            values = values * 255.0
        values = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"An image array must be numeric, got dtype {array.dtype}.")
    return Image.fromarray(
        np.ascontiguousarray(values)
    )  # uint8 (H, W) / (H, W, 3) / (H, W, 4): L / RGB / RGBA


def _as_matrix(embeddings: Any, name: str) -> torch.Tensor:
    """``(N, E)`` float64 CPU tensor of numpy / torch embeddings (one row for a 1-D input)."""
    if isinstance(embeddings, np.ndarray):
        tensor = torch.from_numpy(np.asarray(embeddings, dtype=np.float64))
    elif isinstance(embeddings, torch.Tensor):
        tensor = embeddings.detach().to("cpu", torch.float64)
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(embeddings).__name__}.")
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be 1-D (one embedding) or 2-D (N, E), got shape {tuple(tensor.shape)}."
        )
    return tensor
