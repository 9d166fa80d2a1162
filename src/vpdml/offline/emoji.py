"""Cross-style emoji retrieval: a class-labelled image dataset built from three npm packages, offline.

One class per emoji, one image per drawing style. Retrieval across styles (find Twemoji's "pizza" from
Noto's) is a real metric-learning task: the same concept drawn by different artists, with shared and
conflicting cues (colour, outline, layout). Sources, pinned by version and checksum:

* ``emoji-datasource-google@16.0.0`` -> style ``google`` (Noto Emoji images, Apache-2.0), 64 px PNG;
* ``emoji-datasource-twitter@16.0.0`` -> style ``twitter`` (Twemoji images, CC-BY-4.0), 64 px PNG;
* ``openmoji@17.0.0`` -> styles ``openmoji-color`` and ``openmoji-black`` (CC-BY-SA-4.0), SVG rasterised
  with cairosvg.

Classes are the emojis present in all four styles (all 1,906 non-skin-tone emojis of emoji-datasource
16 are); skin-tone variants and the five skin-tone swatches are left out, since they would be
near-duplicate classes that differ only in colour. An image whose pixels equal another class's image in
the same style (OpenMoji's 259 black-line flags are one empty rectangle; Google draws "student" and
"man student" alike) is dropped, and classes left with fewer than three styles are dropped: 1,826
classes remain, 1,516 with four images and 310 with three. Images are composited on white and stored at
one square size (64 px by default, the emoji-datasource PNG size).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from vpdml.data.splits import DMLSplits
from vpdml.data.splits import select_classes as select_dataset_classes
from vpdml.offline.cache import (
    built_dataset_dir,
    check_image_size,
    is_complete_build,
    resolve_cache_dir,
    save_dataset_build,
)
from vpdml.offline.class_split import split_emoji_classes
from vpdml.offline.npm import NpmPackage, OfflineDatasetError, fetch_npm_package, read_tar_members
from vpdml.offline.rendering import png_bytes, rasterise_svg, to_square_rgb

if TYPE_CHECKING:
    import datasets
    from datasets import Dataset

    from vpdml.data.splits import DMLSplits

STYLES = ("google", "twitter", "openmoji-color", "openmoji-black")
VARIATION_SELECTORS = frozenset({0xFE0E, 0xFE0F})
SKIN_TONE_MODIFIERS = frozenset(range(0x1F3FB, 0x1F3FF + 1))
DEFAULT_IMAGE_SIZE = 64
# A class keeps at least this many styles after ambiguous images are dropped (see ambiguous_images).
MIN_STYLES_PER_CLASS = 3
# Bump when the build changes what ends up in the dataset, so that stale caches are rebuilt.
DATASET_FORMAT_VERSION = 1
BUILD_INFO_FILE = "vpdml_emoji_build.json"


GOOGLE_PACKAGE = NpmPackage(
    "emoji-datasource-google",
    "16.0.0",
    "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    "MIT (metadata); images Apache-2.0 (Noto Emoji)",
)
TWITTER_PACKAGE = NpmPackage(
    "emoji-datasource-twitter",
    "16.0.0",
    "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    "MIT (metadata); images CC-BY-4.0 (Twemoji)",
)
OPENMOJI_PACKAGE = NpmPackage(
    "openmoji",
    "17.0.0",
    "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68",
    "CC-BY-SA-4.0 (OpenMoji)",
)
PACKAGES = (GOOGLE_PACKAGE, TWITTER_PACKAGE, OPENMOJI_PACKAGE)


class EmojiDatasetError(OfflineDatasetError):
    """The emoji dataset cannot be built (npm missing or failing, or a tarball is not the pinned one)."""


# --------------------------------------------------------------------------------------------------
# Code points and pixels
# --------------------------------------------------------------------------------------------------


def parse_codepoints(sequence: str) -> list[int]:
    """Parse ``"1F44D-1F3FB"`` (also ``_`` or space separated, any case) into code point integers."""
    parts = [part for part in sequence.replace("_", "-").replace(" ", "-").split("-") if part]
    if not parts:
        raise ValueError(f"Empty code point sequence: {sequence!r}.")
    try:
        return [int(part, 16) for part in parts]
    except ValueError as error:
        raise ValueError(f"Not a hex code point sequence: {sequence!r}.") from error


def canonical_codepoints(sequence: str) -> str:
    """The class key of an emoji: upper-case hex code points joined by ``-``, variation selectors dropped.

    ``FE0F`` (emoji presentation) and ``FE0E`` (text presentation) choose how a character is shown, not
    which emoji it is, and the packages disagree on where they keep them (``263A-FE0F`` vs ``263A``).
    """
    kept = [codepoint for codepoint in parse_codepoints(sequence) if codepoint not in VARIATION_SELECTORS]
    if not kept:
        raise ValueError(f"Sequence {sequence!r} holds only variation selectors.")
    return "-".join(f"{codepoint:04X}" for codepoint in kept)


def has_skin_tone(sequence: str) -> bool:
    """Whether the sequence holds a Fitzpatrick skin-tone modifier (a variant, or a bare swatch)."""
    return any(codepoint in SKIN_TONE_MODIFIERS for codepoint in parse_codepoints(sequence))


# --------------------------------------------------------------------------------------------------
# Which emojis, which files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmojiClass:
    """One class of the dataset and where each style's image is in the tarballs."""

    codepoints: str
    name: str
    google_png: str
    twitter_png: str
    openmoji_hexcode: str


def datasource_images(emoji_json: bytes, image_set: str) -> dict[str, tuple[str, str, int]]:
    """``canonical code points -> (64 px image path in the tarball, name, sort order)`` for one set."""
    entries = json.loads(emoji_json)
    images: dict[str, tuple[str, str, int]] = {}
    for entry in sorted(entries, key=lambda entry: entry["sort_order"]):
        if not entry.get(f"has_img_{image_set}") or has_skin_tone(entry["unified"]):
            continue
        key = canonical_codepoints(entry["unified"])
        path = f"package/img/{image_set}/64/{entry['image']}"
        images.setdefault(key, (path, entry["name"].lower(), entry["sort_order"]))
    return images


def openmoji_hexcodes(openmoji_json: bytes) -> dict[str, str]:
    """``canonical code points -> OpenMoji hexcode`` (the SVG file stem), skin-tone variants excluded."""
    hexcodes: dict[str, str] = {}
    for entry in json.loads(openmoji_json):
        if entry.get("skintone") or has_skin_tone(entry["hexcode"]):
            continue
        hexcodes.setdefault(canonical_codepoints(entry["hexcode"]), entry["hexcode"])
    return hexcodes


def classes_in_all_styles(
    google: dict[str, tuple[str, str, int]],
    twitter: dict[str, tuple[str, str, int]],
    openmoji: dict[str, str],
    openmoji_svgs: Iterable[str],
) -> list[EmojiClass]:
    """Emojis drawn in all four styles, in emoji-datasource order (so class ids are stable).

    Requiring every style keeps each class at exactly four images (one per style): every test query
    then has three cross-style matches, and no class is easier because a style is missing.
    """
    available_svgs = set(openmoji_svgs)
    classes = []
    for key, (google_png, name, _) in sorted(google.items(), key=lambda item: item[1][2]):
        hexcode = openmoji.get(key)
        if key not in twitter or hexcode is None:
            continue
        if {f"color/{hexcode}", f"black/{hexcode}"} - available_svgs:
            continue
        classes.append(EmojiClass(key, name, google_png, twitter[key][0], hexcode))
    return classes


# --------------------------------------------------------------------------------------------------
# Build and cache
# --------------------------------------------------------------------------------------------------


def emoji_dataset_dir(
    cache_dir: str | os.PathLike[str] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> Path:
    """Where the built dataset is cached (whether or not it exists yet)."""
    return built_dataset_dir(cache_dir, "emoji", DATASET_FORMAT_VERSION, image_size)


def ensure_emoji_dataset(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
    show_progress: bool = True,
) -> Dataset:
    """Build once (npm tarballs -> images on white) and return the cached cross-style emoji dataset.

    Returns a ``datasets.Dataset`` with columns ``image`` (``Image``), ``label`` (``ClassLabel`` whose
    names are the canonical code points), ``style``, ``codepoints`` and ``name``; rows are ordered by
    label, then style. A cached build is loaded without calling npm; ``force=True`` rebuilds it.
    """
    import datasets

    check_image_size(image_size)
    root = resolve_cache_dir(cache_dir)
    target = emoji_dataset_dir(root, image_size)
    if not force and is_complete_build(target, BUILD_INFO_FILE, DATASET_FORMAT_VERSION):
        return datasets.load_from_disk(str(target))

    started = time.perf_counter()
    tarballs = {package.name: fetch_npm_package(package, root) for package in PACKAGES}
    fetched = time.perf_counter()
    records, classes, statistics = _build_records(tarballs, image_size, show_progress=show_progress)
    dataset = datasets.Dataset.from_dict(records, features=_features([emoji.codepoints for emoji in classes]))

    def write_build_info(staging: Path) -> None:  # after the save, so the build time includes it
        timings = {"fetch_s": fetched - started, "build_s": time.perf_counter() - fetched}
        _write_build_info(staging, len(classes), dataset.num_rows, image_size, timings, statistics)

    save_dataset_build(
        dataset,
        target,
        write_build_info,
        info_file=BUILD_INFO_FILE,
        format_version=DATASET_FORMAT_VERSION,
        force=force,
    )
    return datasets.load_from_disk(str(target))


def read_build_info(
    cache_dir: str | os.PathLike[str] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> dict:
    """The record written next to a built dataset (class count, sources, build time)."""
    return json.loads((emoji_dataset_dir(cache_dir, image_size) / BUILD_INFO_FILE).read_text())


@dataclass(frozen=True)
class RenderedImage:
    """One style's image of one class: PNG bytes and a digest of its decoded pixels."""

    png: bytes
    pixel_digest: str


def _build_records(
    tarballs: dict[str, Path], image_size: int, *, show_progress: bool
) -> tuple[dict[str, list[Any]], list[EmojiClass], dict[str, Any]]:
    """Read the tarballs, render every class, drop ambiguous images; return rows, classes, statistics."""
    google_files = read_tar_members(tarballs[GOOGLE_PACKAGE.name], _is_datasource_file("google"))
    twitter_files = read_tar_members(tarballs[TWITTER_PACKAGE.name], _is_datasource_file("twitter"))
    openmoji_files = read_tar_members(tarballs[OPENMOJI_PACKAGE.name], _is_openmoji_file)
    svgs = {
        name.removeprefix("package/").removesuffix(".svg").replace("/svg/", "/"): data
        for name, data in openmoji_files.items()
        if name.endswith(".svg")
    }
    candidates = classes_in_all_styles(
        _existing(datasource_images(google_files["package/emoji.json"], "google"), google_files),
        _existing(datasource_images(twitter_files["package/emoji.json"], "twitter"), twitter_files),
        openmoji_hexcodes(openmoji_files["package/data/openmoji.json"]),
        svgs,
    )
    if not candidates:
        raise EmojiDatasetError("No emoji is present in all four styles: the package layouts changed.")

    sources = [
        (
            google_files[emoji.google_png],
            twitter_files[emoji.twitter_png],
            svgs[f"color/{emoji.openmoji_hexcode}"],
            svgs[f"black/{emoji.openmoji_hexcode}"],
            image_size,
        )
        for emoji in candidates
    ]
    rendered = _render_all(sources, show_progress)
    ambiguous = ambiguous_images([[image.pixel_digest for image in images] for images in rendered])

    records: dict[str, list[Any]] = {"image": [], "label": [], "style": [], "codepoints": [], "name": []}
    classes: list[EmojiClass] = []
    for index, (emoji, images) in enumerate(zip(candidates, rendered, strict=True)):
        kept = [
            (style, image)
            for style, image in zip(STYLES, images, strict=True)
            if (index, style) not in ambiguous
        ]
        if len(kept) < MIN_STYLES_PER_CLASS:
            continue
        label = len(classes)
        classes.append(emoji)
        for style, image in kept:
            records["image"].append({"bytes": image.png, "path": None})
            records["label"].append(label)
            records["style"].append(style)
            records["codepoints"].append(emoji.codepoints)
            records["name"].append(emoji.name)
    statistics = {
        "candidate_classes": len(candidates),
        "ambiguous_images_dropped": {style: sum(key[1] == style for key in ambiguous) for style in STYLES},
        "classes_dropped_below_min_styles": len(candidates) - len(classes),
    }
    return records, classes, statistics


def ambiguous_images(pixel_digests: list[list[str]]) -> set[tuple[int, str]]:
    """``(class index, style)`` of images whose pixels equal another class's image in the same style.

    Such an image says nothing about its class (OpenMoji draws all 259 black-line flags as the same
    empty rectangle; Norway's and Svalbard's flags are one picture), and keeping it would put a
    relevant item into another class's results at distance zero.
    """
    counts: dict[tuple[str, str], int] = {}
    for digests in pixel_digests:
        for style, digest in zip(STYLES, digests, strict=True):
            counts[style, digest] = counts.get((style, digest), 0) + 1
    return {
        (index, style)
        for index, digests in enumerate(pixel_digests)
        for style, digest in zip(STYLES, digests, strict=True)
        if counts[style, digest] > 1
    }


ClassSources = tuple[bytes, bytes, bytes, bytes, int]


def render_class(sources: ClassSources) -> list[RenderedImage]:
    """One class's four styles (order of ``STYLES``) at a common size, on white."""
    google_png, twitter_png, color_svg, black_svg, image_size = sources
    images = [
        to_square_rgb(Image.open(io.BytesIO(google_png)), image_size),
        to_square_rgb(Image.open(io.BytesIO(twitter_png)), image_size),
        rasterise_svg(color_svg, image_size),
        rasterise_svg(black_svg, image_size),
    ]
    return [RenderedImage(png_bytes(image), hashlib.sha256(image.tobytes()).hexdigest()) for image in images]


def _render_all(sources: list[ClassSources], show_progress: bool) -> list[list[RenderedImage]]:
    """Render every class, in order, on the available CPU cores (SVG rasterising dominates the build)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(cores, 8))
    progress = {"total": len(sources), "desc": "Rasterising emoji", "unit": "class", "mininterval": 1.0}
    if workers == 1:
        return [render_class(item) for item in tqdm(sources, disable=not show_progress, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rendered = pool.map(render_class, sources, chunksize=32)
        return list(tqdm(rendered, disable=not show_progress, **progress))


def _is_datasource_file(image_set: str) -> Callable[[str], bool]:
    prefix = f"package/img/{image_set}/64/"
    return lambda name: name == "package/emoji.json" or (name.startswith(prefix) and name.endswith(".png"))


def _is_openmoji_file(name: str) -> bool:
    return name == "package/data/openmoji.json" or name.startswith(
        ("package/color/svg/", "package/black/svg/")
    )


def _existing(
    images: dict[str, tuple[str, str, int]], files: dict[str, bytes]
) -> dict[str, tuple[str, str, int]]:
    """Drop entries whose image file is not in the tarball (metadata can list more than it ships)."""
    return {key: value for key, value in images.items() if value[0] in files}


def _features(class_names: list[str]) -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "style": datasets.Value("string"),
            "codepoints": datasets.Value("string"),
            "name": datasets.Value("string"),
        }
    )


def _write_build_info(
    directory: Path,
    num_classes: int,
    num_images: int,
    image_size: int,
    timings: dict[str, float],
    statistics: dict[str, Any],
) -> None:
    info = {
        "format_version": DATASET_FORMAT_VERSION,
        "num_classes": num_classes,
        "num_images": num_images,
        "styles": list(STYLES),
        "image_size": image_size,
        "sources": [
            {"package": package.spec, "sha256": package.sha256, "license": package.license}
            for package in PACKAGES
        ],
        "min_styles_per_class": MIN_STYLES_PER_CLASS,
        "selection": statistics,
        "timings_s": {name: round(seconds, 2) for name, seconds in timings.items()},
    }
    (directory / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def emoji_splits(
    seed: int = 0,
    num_train_classes: int | None = None,
    num_test_classes: int | None = None,
    validation_classes: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    dataset: Dataset | None = None,
    show_progress: bool = True,
) -> DMLSplits:
    """Class-disjoint ``DMLSplits`` of the emoji dataset: train on half the classes, test on the other.

    ``dataset`` defaults to :func:`ensure_emoji_dataset` (built on first use). Each split gets
    contiguous labels; ``original_label`` keeps the emoji class id (``ClassLabel`` names are the code
    points). Every class has its four styles in whichever split it lands.
    """

    if dataset is None:
        dataset = ensure_emoji_dataset(cache_dir, image_size=image_size, show_progress=show_progress)
    num_classes = dataset.features["label"].num_classes
    train, validation, test = split_emoji_classes(
        num_classes, seed, num_train_classes, num_test_classes, validation_classes
    )
    return DMLSplits(
        name="emoji",
        train=select_dataset_classes(dataset, train),
        test=select_dataset_classes(dataset, test),
        validation=select_dataset_classes(dataset, validation) if validation else None,
    )
