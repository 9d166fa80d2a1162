"""Image transforms for DML training and evaluation, in plain PIL + numpy + torch (no torchvision).

- :class:`TrainTransform`: RandomResizedCrop(size, scale, ratio) + horizontal flip + normalise;
- :class:`EvalTransform`: resize the shorter side to ``round(size / crop_fraction)`` (256 for 224) +
  center crop + normalise;
- :func:`transforms_from_processor` builds both from a transformers image processor (or its settings);
- :class:`DMLTransformDataset` turns a ``datasets.Dataset`` into ``{"pixel_values", "labels"}`` samples,
  and :func:`collate` stacks them into a batch.

Reproducible augmentation: every random choice is drawn from an explicit ``torch.Generator``.
``DMLTransformDataset`` seeds one per sample from ``(seed, epoch, index)``, so a resumed run, or a run
with a different number of DataLoader workers, sees exactly the same crops and flips. (An image that
appears twice in one epoch, e.g. a topped-up class smaller than ``m``, gets the same augmentation both
times.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_FRACTION = 0.875  # 224 / 256, the usual ImageNet evaluation ratio
WHITE = (255, 255, 255)


class ImageTransform(Protocol):
    """A transform from any PIL image to a float32 ``(3, S, S)`` tensor; may use a generator."""

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor: ...


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Transparent images (RGBA, LA, PA, P with a transparent colour) are composited on white, the usual
    background of product and bird photos. 16/32-bit integer and float images are rescaled to 0..255
    (PIL's own ``convert`` would clip them instead).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, got {type(image).__name__}.")
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(_high_depth_to_uint8(image)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (*WHITE, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit or float grayscale image to uint8.

    Integer images are scaled by their bit depth (values up to 255 are taken as 8-bit already, since
    PIL opens many 8-bit-range files as mode "I"); float images in [0, 1] are scaled by 255, other float
    ranges are clipped to 0..255.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
    else:
        maximum = values.max() if values.size else 0.0
        peak = 255.0 if maximum <= 255 else (65535.0 if maximum <= 65535 else float(2**32 - 1))
    return np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 ``(3, H, W)`` tensor, scaled to [0, 1] then ``(x - mean) / std``."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in pixels: ``top``, ``left``, ``height``, ``width``."""

    top: int
    left: int
    height: int
    width: int

    def as_pil_box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.width, self.top + self.height)


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> CropBox:
    """Pick a RandomResizedCrop rectangle (same algorithm as torchvision).

    Up to 10 tries of a random area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, the largest center crop with an aspect ratio clamped to ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = _randint(generator, 0, height - crop_height)
            left = _randint(generator, 0, width - crop_width)
            return CropBox(top, left, crop_height, crop_width)
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def center_crop_box(width: int, height: int, size: int) -> CropBox:
    """The ``size x size`` box in the middle of the image, offsets rounded down as transformers' image processors
    do (so a saved ``preprocessor_config.json`` reproduces it; torchvision rounds half to even instead)."""
    if width < size or height < size:
        raise ValueError(f"Cannot center-crop {size}x{size} from a {width}x{height} image; resize it first.")
    return CropBox((height - size) // 2, (width - size) // 2, size, size)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio (bilinear, antialiased)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_size = (size, max(1, int(size * height / width)))
    else:
        new_size = (max(1, int(size * width / height)), size)
    return image.resize(new_size, Image.Resampling.BILINEAR)


def _check_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {mean} and {std}.")
    if any(v <= 0 for v in std):
        raise ValueError(f"std values must be positive, got {std}.")
    return mean, std


def _check_size(size: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}.")
    return size


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop to ``size`` + horizontal flip + normalise; randomness from ``generator``."""

    size: int = DEFAULT_IMAGE_SIZE
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        mean, std = _check_normalization(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}.")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}.")

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        box = random_resized_crop_box(*image.size, self.scale, self.ratio, generator)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box.as_pil_box())
        if _uniform(generator, 0.0, 1.0) < self.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(image, self.mean, self.std)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``resize_size``, center-crop ``size``, normalise. Deterministic."""

    size: int = DEFAULT_IMAGE_SIZE
    resize_size: int | None = None  # default: round(size / DEFAULT_CROP_FRACTION), 256 for 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        resize_size = self.resize_size
        if resize_size is None:
            resize_size = round(self.size / DEFAULT_CROP_FRACTION)
        if _check_size(resize_size, "resize_size") < self.size:
            raise ValueError(f"resize_size ({resize_size}) must be >= size ({self.size}).")
        object.__setattr__(self, "resize_size", resize_size)
        mean, std = _check_normalization(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` is accepted (and ignored) so both transforms share one call signature."""
        image = resize_shorter_side(to_rgb(image), cast(int, self.resize_size))  # set in __post_init__
        box = center_crop_box(*image.size, self.size)
        return normalize(image.crop(box.as_pil_box()), self.mean, self.std)


def transforms_from_processor(
    processor: Any,
    image_size: int | None = None,
    *,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[TrainTransform, EvalTransform]:
    """Build the train and eval transforms matching a model's image processor.

    ``processor`` is a transformers image processor, its ``to_dict()``, or a plain mapping with
    ``image_mean``, ``image_std`` and ``size``/``crop_size`` (any missing key falls back to ImageNet
    statistics / 224). The crop size S is ``image_size`` if given, else the processor's ``crop_size``,
    else its ``size`` (height or shortest edge). Evaluation resizes the shorter side to
    ``round(S / crop_fraction)`` before the center crop; ``do_normalize=False`` disables normalisation.
    """
    settings = _processor_settings(processor)
    size = image_size if image_size is not None else _processor_image_size(settings)
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    if settings.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = _three_channels(settings.get("image_mean", IMAGENET_MEAN), "image_mean")
        std = _three_channels(settings.get("image_std", IMAGENET_STD), "image_std")
    train = TrainTransform(size=size, mean=mean, std=std, scale=scale, ratio=ratio)
    evaluation = EvalTransform(size=size, resize_size=round(size / crop_fraction), mean=mean, std=std)
    return train, evaluation


def _processor_settings(processor: Any) -> dict[str, Any]:
    if isinstance(processor, Mapping):
        return dict(processor)
    if hasattr(processor, "to_dict"):
        return processor.to_dict()
    raise TypeError(
        f"Expected a transformers image processor or a dict of its settings, got {type(processor).__name__}."
    )


def _size_field(size: Any, key: str) -> int | None:
    """Read ``key`` from a processor size given as an int, a dict or a SizeDict."""
    if isinstance(size, int):
        return size
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value is not None else None


def _processor_image_size(settings: Mapping[str, Any]) -> int:
    for key in ("crop_size", "size"):
        size = settings.get(key)
        if size is None:
            continue
        for field in ("height", "shortest_edge", "width"):
            value = _size_field(size, field)
            if value is not None:
                return value
    return DEFAULT_IMAGE_SIZE


def _three_channels(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"Processor {name} must have 1 or 3 values, got {values}.")
    return values[0], values[1], values[2]


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, a pure function of (base seed, epoch, index)."""
    state = np.random.SeedSequence([base_seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class DMLTransformDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` of images and labels, yielding ``{"pixel_values", "labels"}``.

    With ``seed`` set, sample ``index`` in epoch ``e`` is transformed with a ``torch.Generator`` seeded
    from ``(seed, e, index)``, so augmentations do not depend on worker count, order or resumption.
    Call ``set_epoch`` each epoch (accelerate's prepared DataLoader does so itself). DataLoader workers
    get a copy of the dataset when an iterator starts: with ``persistent_workers=True`` the epoch would
    not reach them, so keep persistent workers off when augmentations must be reproducible. With
    ``seed=None`` the transform draws from torch's global generator.
    """

    def __init__(
        self,
        dataset: Any,
        transform: ImageTransform,
        *,
        seed: int | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
        if missing:
            raise KeyError(f"Dataset lacks column(s) {missing} (columns: {dataset.column_names}).")
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.image_column = image_column
        self.label_column = label_column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` reproduces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, int(index)))
        try:
            row = self.dataset[int(index)]
            pixel_values = self.transform(row[self.image_column], generator)
        except (OSError, SyntaxError) as error:  # PIL: unreadable, truncated or unidentifiable image files
            source = _image_source(self.dataset, self.image_column, int(index))
            raise ValueError(
                f"Image {int(index)} of the dataset{source} cannot be decoded ({error.__class__.__name__}: {error}). "
                "The file is truncated, corrupt or not an image: re-save or remove it."
            ) from error
        return {"pixel_values": pixel_values, "labels": int(row[self.label_column])}


def _image_source(dataset: Any, column: str, index: int) -> str:
    """`` (file <path>)`` for a ``datasets.Image`` column whose row has a path, else ``""`` (best effort)."""
    try:
        from datasets import Image as ImageFeature

        raw = dataset.cast_column(column, ImageFeature(decode=False))[index][column]
        return f" (file {raw['path']})" if raw.get("path") else ""
    except Exception:  # best effort: it only improves an error message
        return ""


def with_transform(
    dataset: Any, transform: ImageTransform, *, seed: int | None = None, **columns: str
) -> DMLTransformDataset:
    """Shorthand for :class:`DMLTransformDataset` (``columns``: ``image_column=``, ``label_column=``)."""
    return DMLTransformDataset(dataset, transform, seed=seed, **columns)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``{"pixel_values", "labels"}`` samples into a batch of tensors."""
    if not samples:
        raise ValueError("Cannot collate an empty batch.")
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "labels": torch.tensor([int(sample["labels"]) for sample in samples], dtype=torch.long),
    }
