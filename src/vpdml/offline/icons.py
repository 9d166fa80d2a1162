"""Cross-style icon retrieval: a class-labelled image dataset built from Material Design icons, offline.

One class per icon name, one image per drawing style (``filled``, ``outlined``, ``round``, ``sharp``,
``two-tone``): the same concept drawn solid, as an outline, with round or square corners, or with a light
tint. Source: ``@material-design-icons/svg@0.14.15`` on npm (Apache-2.0; Google's Material Design icons as
optimised SVGs, 2,122 icons in each of the five styles), pinned by sha256, rasterised with cairosvg and
composited on white (64 px by default).

The styles often draw an icon the same way (filled and sharp are pixel-identical for 916 icons), and some
icons are one picture under several names (``alarm`` and ``access_alarm``, ``schedule`` and
``query_builder``). Pictures are compared at 64 px; two are "the same" when no pixel differs by more than
64 of 255 levels. Within a class one image per distinct picture is kept; classes with fewer than three
distinct pictures are dropped; classes that share a picture are one icon under several names, and only the
one with the most distinct pictures (then the first by name) is kept. Result: 1,455 classes, 6,086 images
(611 classes with five images, 499 with four, 345 with three); 532 icons had fewer than three distinct
pictures and 135 were aliases. See ``docs/icons-benchmark.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from vpdml.offline.npm import (
    NpmPackage,
    OfflineDatasetError,
    ScopedNpmPackage,
    fetch_npm_package,
    read_tar_members,
)
from vpdml.offline.pictures import (
    SAME_PICTURE_TOLERANCE,
    connected_components,
    ordered_groups,
    same_picture_groups,
)
from vpdml.offline.rendering import available_cores, png_bytes, rasterise_svg

if TYPE_CHECKING:
    import datasets
    from datasets import Dataset

ICON_STYLES = ("filled", "outlined", "round", "sharp", "two-tone")
DEFAULT_IMAGE_SIZE = 64
# A class keeps at least this many distinct pictures (styles drawn alike count once).
MIN_STYLES_PER_CLASS = 3
# Pictures are compared at this size whatever size is stored, so every image size has the same classes.
COMPARISON_SIZE = 64
# SAME_PICTURE_TOLERANCE (64 of 255, from vpdml.offline.pictures): the same outline drawn with other path data
# differs by anti-aliasing only (up to ~60 levels at 64 px), while a real difference fills whole pixels (255)
# and two-tone's 30%-opacity tint differs from white by 77.
# Bump when the build changes what ends up in the dataset, so that stale caches are rebuilt.
DATASET_FORMAT_VERSION = 1
BUILD_INFO_FILE = "vpdml_icons_build.json"
# Below this many icons, rendering in worker processes costs more than it saves.
MIN_ICONS_FOR_WORKERS = 256
MAX_RENDER_WORKERS = 4


ICON_PACKAGE = ScopedNpmPackage(
    "@material-design-icons/svg",
    "0.14.15",
    "ad2e66e39dce7fd92a290b5dd8e8268cd0a471baa588f41b184782d6546202ed",
    "Apache-2.0 (Material Design icons, Google; SVGs optimised by marella/material-design-icons)",
)
_ICON_MEMBER = re.compile(
    r"^package/(?P<style>" + "|".join(map(re.escape, ICON_STYLES)) + r")/(?P<name>[^/]+)\.svg$"
)


class IconDatasetError(OfflineDatasetError):
    """The icon dataset cannot be built (npm missing or failing, a bad tarball, an unreadable SVG)."""


# --------------------------------------------------------------------------------------------------
# The npm tarball and its layout
# --------------------------------------------------------------------------------------------------


def fetch_icon_package(cache_dir: Path, package: NpmPackage = ICON_PACKAGE) -> Path:
    """The pinned tarball under ``cache_dir/npm`` (``npm pack`` runs only when it is absent or altered)."""
    cached = cache_dir / "npm" / package.tarball_name
    already_there = cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == package.sha256
    if not already_there and shutil.which("npm") is None:
        raise IconDatasetError(
            f"Building the icon dataset downloads {package.spec} with `npm pack`, but npm is not on PATH. "
            f"Install Node.js/npm (e.g. `apt-get install npm`) or copy the tarball to {cached} yourself."
        )
    try:
        return fetch_npm_package(package, cache_dir)
    except OfflineDatasetError as error:  # the shared npm helper reports npm failures and checksum mismatches
        raise IconDatasetError(str(error)) from error


def read_icon_svgs(tarball: Path) -> dict[str, dict[str, bytes]]:
    """``icon name -> {style: SVG bytes}`` from the ``package/<style>/<name>.svg`` members, nothing else."""
    try:
        members = read_tar_members(tarball, lambda name: _ICON_MEMBER.match(name) is not None)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise IconDatasetError(
            f"{tarball} is not a readable .tgz ({error}); delete it so that it is fetched again."
        ) from error
    icons: dict[str, dict[str, bytes]] = {}
    for member, svg in members.items():
        match = _ICON_MEMBER.match(member)
        if match is not None:
            icons.setdefault(match["name"], {})[match["style"]] = svg
    return icons


def candidate_icons(icons: dict[str, dict[str, bytes]]) -> list[str]:
    """Icon names drawn in at least ``MIN_STYLES_PER_CLASS`` styles, sorted (so class ids are stable)."""
    return sorted(name for name, styles in icons.items() if len(styles) >= MIN_STYLES_PER_CLASS)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedIcon:
    """One style of one icon: PNG bytes at the stored size and the pixels at ``COMPARISON_SIZE``."""

    png: bytes
    reference: np.ndarray


IconSources = tuple[str, tuple[tuple[str, bytes], ...], int]


def render_icon(sources: IconSources) -> list[RenderedIcon]:
    """Render one icon's styles (given as ``(style, svg)`` pairs) on white, stored and comparison sizes."""
    name, svgs, image_size = sources
    rendered = []
    for style, svg in svgs:
        try:
            reference = rasterise_svg(svg, COMPARISON_SIZE)
            image = reference if image_size == COMPARISON_SIZE else rasterise_svg(svg, image_size)
        except OfflineDatasetError as error:  # cairosvg (or the cairo library) is missing
            raise IconDatasetError(str(error)) from error
        except Exception as error:
            raise IconDatasetError(f"Cannot rasterise icon {name!r} ({style}): {error}") from error
        rendered.append(RenderedIcon(png_bytes(image), np.asarray(reference)))
    return rendered


def _render_all(sources: list[IconSources], show_progress: bool) -> list[list[RenderedIcon]]:
    """Render every icon in order; a few worker processes when there are many (rasterising dominates)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    workers = max(1, min(available_cores(), MAX_RENDER_WORKERS))
    progress = {"total": len(sources), "desc": "Rasterising icons", "unit": "icon", "mininterval": 1.0}
    if workers == 1 or len(sources) < MIN_ICONS_FOR_WORKERS:
        return [render_icon(item) for item in tqdm(sources, disable=not show_progress, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(render_icon, sources, chunksize=32), disable=not show_progress, **progress))


# --------------------------------------------------------------------------------------------------
# Which pictures are the same, which classes are kept
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IconClass:
    """A kept class: its icon name and its distinct pictures, each the styles that draw it (first shown)."""

    name: str
    pictures: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class IconSelection:
    """Which classes are kept, and why the others are not."""

    classes: list[IconClass]
    too_few_styles: list[str]
    aliases: dict[str, str]  # dropped icon name -> the kept icon that draws a same picture


def distinct_pictures(style_groups: dict[str, int]) -> tuple[tuple[str, ...], ...]:
    """Styles grouped by picture, in ``ICON_STYLES`` order: ``(("filled", "sharp"), ("outlined",), ...)``."""
    return ordered_groups(ICON_STYLES, style_groups)


def select_icon_classes(names: Sequence[str], style_groups: Sequence[dict[str, int]]) -> IconSelection:
    """Keep classes with enough distinct pictures, then one class per set of names sharing a picture.

    ``style_groups[i]`` maps each style of icon ``names[i]`` to its picture group (``same_picture_groups``).
    A class with fewer than ``MIN_STYLES_PER_CLASS`` distinct pictures is dropped (all five Material styles
    of ``add`` are one plus sign). Classes that share a picture (directly or through a chain) are one icon
    under several names (``alarm``/``access_alarm``): a query would find the other name's copy at distance
    zero. Of such a set, the class with the most distinct pictures is kept (ties: the first in ``names``),
    so it is no longer ambiguous with anything left.
    """
    pictures = [distinct_pictures(groups) for groups in style_groups]
    eligible = [index for index, found in enumerate(pictures) if len(found) >= MIN_STYLES_PER_CLASS]
    owner_of_group: dict[int, int] = {}
    edges = []
    for position, index in enumerate(eligible):
        for group in set(style_groups[index].values()):
            edges.append((owner_of_group.setdefault(group, position), position))
    components = connected_components(len(eligible), edges)
    best: dict[int, int] = {}
    for position, index in enumerate(eligible):
        current = best.setdefault(int(components[position]), index)
        if len(pictures[index]) > len(pictures[current]):
            best[int(components[position])] = index
    kept = sorted(best.values())
    aliases = {
        names[index]: names[best[int(components[position])]]
        for position, index in enumerate(eligible)
        if best[int(components[position])] != index
    }
    return IconSelection(
        classes=[IconClass(names[index], pictures[index]) for index in kept],
        too_few_styles=[
            names[index] for index, found in enumerate(pictures) if len(found) < MIN_STYLES_PER_CLASS
        ],
        aliases=aliases,
    )


# --------------------------------------------------------------------------------------------------
# Build and cache
# --------------------------------------------------------------------------------------------------


def icon_dataset_dir(
    cache_dir: str | os.PathLike[str] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> Path:
    """Where the built dataset is cached (whether or not it exists yet)."""
    return built_dataset_dir(cache_dir, "icons", DATASET_FORMAT_VERSION, image_size)


def ensure_icon_dataset(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
    show_progress: bool = True,
) -> Dataset:
    """Build once (npm tarball -> icons on white) and return the cached cross-style icon dataset.

    Returns a ``datasets.Dataset`` with columns ``image`` (``Image``, RGB), ``label`` (``ClassLabel`` whose
    names are the icon names), ``style`` (the first style, in ``ICON_STYLES`` order, that draws this
    picture), ``styles`` (every style that draws it, comma-separated) and ``name``; rows are ordered by
    label, then style. A cached build is loaded without calling npm; ``force=True`` rebuilds it.
    """
    import datasets

    check_image_size(image_size)
    root = resolve_cache_dir(cache_dir)
    target = icon_dataset_dir(root, image_size)
    if not force and is_complete_build(target, BUILD_INFO_FILE, DATASET_FORMAT_VERSION):
        return datasets.load_from_disk(str(target))

    started = time.perf_counter()
    tarball = fetch_icon_package(root)
    fetched = time.perf_counter()
    records, selection, statistics = _build_records(tarball, image_size, show_progress=show_progress)
    dataset = datasets.Dataset.from_dict(
        records, features=_features([icon.name for icon in selection.classes])
    )

    def write_build_info(staging: Path) -> None:  # after the save, so the build time includes it
        timings = {"fetch_s": fetched - started, "build_s": time.perf_counter() - fetched}
        _write_build_info(staging, dataset.num_rows, image_size, timings, selection, statistics)

    save_dataset_build(
        dataset,
        target,
        write_build_info,
        info_file=BUILD_INFO_FILE,
        format_version=DATASET_FORMAT_VERSION,
        force=force,
    )
    return datasets.load_from_disk(str(target))


def read_icon_build_info(
    cache_dir: str | os.PathLike[str] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> dict:
    """The record written next to a built dataset (counts, what was dropped and why, source, build time)."""
    return json.loads((icon_dataset_dir(cache_dir, image_size) / BUILD_INFO_FILE).read_text())


def _build_records(
    tarball: Path, image_size: int, *, show_progress: bool
) -> tuple[dict[str, list[Any]], IconSelection, dict[str, Any]]:
    """Read the tarball, render every candidate, select classes; return rows, selection, statistics."""
    icons = read_icon_svgs(tarball)
    names = candidate_icons(icons)
    if not names:
        raise IconDatasetError(
            f"{tarball.name} holds no icon drawn in {MIN_STYLES_PER_CLASS} of the styles "
            f"{', '.join(ICON_STYLES)} "
            "(expected package/<style>/<name>.svg): the package layout changed."
        )
    sources = [
        (
            name,
            tuple((style, icons[name][style]) for style in ICON_STYLES if style in icons[name]),
            image_size,
        )
        for name in names
    ]
    rendered = _render_all(sources, show_progress)
    groups = same_picture_groups(np.stack([image.reference for images in rendered for image in images]))
    style_groups, pngs, offset = [], {}, 0
    for (name, svgs, _), images in zip(sources, rendered, strict=True):
        style_groups.append(
            {style: int(groups[offset + position]) for position, (style, _) in enumerate(svgs)}
        )
        pngs.update({(name, style): image.png for (style, _), image in zip(svgs, images, strict=True)})
        offset += len(svgs)
    selection = select_icon_classes(names, style_groups)
    if not selection.classes:
        raise IconDatasetError(f"No icon of {tarball.name} has {MIN_STYLES_PER_CLASS} distinct styles.")

    records: dict[str, list[Any]] = {"image": [], "label": [], "style": [], "styles": [], "name": []}
    for label, icon in enumerate(selection.classes):
        for styles in icon.pictures:
            records["image"].append({"bytes": pngs[icon.name, styles[0]], "path": None})
            records["label"].append(label)
            records["style"].append(styles[0])
            records["styles"].append(",".join(styles))
            records["name"].append(icon.name)
    return records, selection, _statistics(names, sources, selection)


def _statistics(names: list[str], sources: list[IconSources], selection: IconSelection) -> dict[str, Any]:
    per_class = [len(icon.pictures) for icon in selection.classes]
    kept_styles = [styles[0] for icon in selection.classes for styles in icon.pictures]
    return {
        "candidate_classes": len(names),
        "candidate_images": sum(len(svgs) for _, svgs, _ in sources),
        "classes_dropped_too_few_distinct_styles": len(selection.too_few_styles),
        "classes_dropped_as_aliases": len(selection.aliases),
        "aliases": selection.aliases,
        "images_per_class": {str(size): per_class.count(size) for size in sorted(set(per_class))},
        "images_per_style": {style: kept_styles.count(style) for style in ICON_STYLES},
        "same_as_an_earlier_style_dropped": {
            style: sum(style in styles[1:] for icon in selection.classes for styles in icon.pictures)
            for style in ICON_STYLES
        },
    }


def _features(class_names: list[str]) -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "style": datasets.Value("string"),
            "styles": datasets.Value("string"),
            "name": datasets.Value("string"),
        }
    )


def _write_build_info(
    directory: Path,
    num_images: int,
    image_size: int,
    timings: dict[str, float],
    selection: IconSelection,
    statistics: dict[str, Any],
) -> None:
    info = {
        "format_version": DATASET_FORMAT_VERSION,
        "num_classes": len(selection.classes),
        "num_images": num_images,
        "styles": list(ICON_STYLES),
        "image_size": image_size,
        "source": {
            "package": ICON_PACKAGE.spec,
            "sha256": ICON_PACKAGE.sha256,
            "license": ICON_PACKAGE.license,
        },
        "min_styles_per_class": MIN_STYLES_PER_CLASS,
        "comparison_size": COMPARISON_SIZE,
        "same_picture_tolerance": SAME_PICTURE_TOLERANCE,
        "selection": statistics,
        "timings_s": {name: round(seconds, 2) for name, seconds in timings.items()},
    }
    (directory / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Class-disjoint splits
# --------------------------------------------------------------------------------------------------


def icon_splits(
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
    """Class-disjoint ``DMLSplits`` (name ``"icons"``): train on half the icons, test on the other half.

    ``dataset`` defaults to :func:`ensure_icon_dataset` (built on first use). The class split is the
    emoji benchmark's (:func:`vpdml.offline.emoji.split_emoji_classes`): a seeded shuffle cut in halves,
    validation held out of the training half first, subsets taken as prefixes. Each split gets contiguous
    labels; ``original_label`` keeps the icon class id (``ClassLabel`` names are the icon names).
    """
    if dataset is None:
        dataset = ensure_icon_dataset(cache_dir, image_size=image_size, show_progress=show_progress)
    num_classes = dataset.features["label"].num_classes
    train, validation, test = split_emoji_classes(
        num_classes, seed, num_train_classes, num_test_classes, validation_classes
    )
    return DMLSplits(
        name="icons",
        train=select_dataset_classes(dataset, train),
        test=select_dataset_classes(dataset, test),
        validation=select_dataset_classes(dataset, validation) if validation else None,
    )
