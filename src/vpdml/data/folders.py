"""Image collections as ``datasets.Dataset``: a folder tree, a Hub dataset column, single query files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from vpdml.data.transforms import to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder_dataset(folder: Path) -> tuple[Any, list[str]]:
    """A ``datasets.Dataset`` (image, label) of every image under ``folder``, and the relative paths.

    Labels are the index of the top-level sub-folder (sorted) when every image lies in one, else -1.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {folder}.")
    relative = [p.relative_to(folder) for p in files]
    if all(len(r.parts) > 1 for r in relative):
        classes = sorted({r.parts[0] for r in relative})
        labels = [classes.index(r.parts[0]) for r in relative]
    else:
        labels = [-1] * len(files)
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict({"image": [str(p) for p in files], "label": labels}, features=features)
    return dataset, [r.as_posix() for r in relative]


def hub_image_dataset(name: str, split: str, image_column: str, label_column: str) -> tuple[Any, list[str]]:
    import datasets

    dataset = datasets.load_dataset(name, split=split)
    if image_column not in dataset.column_names:
        raise KeyError(f"{name} has no image column {image_column!r} (columns: {dataset.column_names}).")
    if label_column in dataset.column_names:
        dataset = dataset.select_columns([image_column, label_column]).rename_columns(
            {image_column: "image", label_column: "label"}
        )
    else:
        dataset = dataset.select_columns([image_column]).rename_column(image_column, "image")
        dataset = dataset.add_column("label", [-1] * dataset.num_rows)
    return dataset, [f"{name}/{split}/{index}" for index in range(dataset.num_rows)]


def open_query_image(path: str | Path) -> Any:
    """A query image read as ``index build`` reads gallery files: transparency over white, 16-bit scaled.

    (``convert("RGB")`` would keep the colours hidden under transparent pixels, so a transparent PNG would not
    match its own gallery copy.)
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
