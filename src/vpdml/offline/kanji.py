"""Cross-font kanji retrieval: a class-labelled image dataset with many images per class, built offline.

One class per kanji, one image per typeface: the same character drawn by 28 Japanese Google Fonts families
(gothic, mincho, rounded, handwritten, brush, pop, pixel and display designs), so a class has about 28 images
where the emoji and icon benchmarks have 3-5: the regime of CUB/Cars in the literature. Source: the
``@expo-google-fonts/<family>`` npm packages (``vpdml.offline.kanji_fonts``; 178 MB of tarballs, fonts under
OFL-1.1, Kosugi Maru under Apache-2.0), pinned by version and sha256, one file per family (the Regular / 400
weight, so images differ by design, not weight).

Classes are the kanji (CJK Unified Ideographs) that every font maps: 2,950 (about JIS level 1), of which a
seeded 2,000 are kept. Each glyph is rasterised with FreeType (Pillow) at twice the image size, cropped to its
ink and scaled so that its longer side fills the square less a 1/16 margin, black on white (64 px by default).
A picture that a font draws for two kanji is dropped from both (Hina Mincho draws 樋 as 通); within a class one
image per distinct picture is kept (the icon benchmark's test, ``vpdml.offline.pictures``: DotGothic16's 一 is
BIZ UDGothic's); a class needs ``MIN_IMAGES_PER_CLASS`` distinct pictures (none falls short). Result: 2,000
classes, 55,997 images (1,997 classes with 28 images, 3 with 27), 164 MB on disk; built in 4 minutes on two
busy cores. Zero-shot R@1 of the offline backbone on 250 test classes: 0.553 (MAP@R 0.119). See
``docs/kanji-benchmark.md``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

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
from vpdml.offline.kanji_fonts import (
    KANJI_FIRST,
    KANJI_FONTS,
    KANJI_LAST,
    FontFacts,
    KanjiDatasetError,
    KanjiFont,
    fetch_font_package,
    read_font_facts,
    read_font_file,
)
from vpdml.offline.pictures import SAME_PICTURE_TOLERANCE, ordered_groups, same_picture_groups
from vpdml.offline.rendering import available_cores, png_bytes

if TYPE_CHECKING:
    import datasets
    from datasets import Dataset

DEFAULT_IMAGE_SIZE = 64
# Pictures are compared at this size whatever size is stored, so every image size has the same classes.
COMPARISON_SIZE = 64
# Glyphs are rasterised at an em size of twice the image size (this at least, in px) and scaled down. 2x
# supersampling: 4x looks no different at 64 px but takes 2.5x longer (FreeType's time grows with the pixel
# count: Noto Sans JP takes 2 ms a glyph at 128 px, 6 ms at 256 px).
REFERENCE_EM = 128
# Blank margin on each side of the glyph's ink box, as a fraction of the image size (4 px at 64 px).
MARGIN_FRACTION = 1 / 16
# A glyph whose darkest pixel is lighter than this (of 255) is blank: nothing drawn, or a faint speck.
BLANK_INK_LEVEL = 128
# More shared kanji than this: a seeded subset (Unicode orders the block by radical, so a prefix would cover
# only the first radicals). 2,000 classes leave 1,000 per class-disjoint half, far above the benchmarks' 250.
MAX_CLASSES = 2000
CLASS_SUBSET_SEED = 0
# A kept class has at least this many distinct pictures (fonts that draw it alike count once).
MIN_IMAGES_PER_CLASS = 20
# Bump when the build changes what ends up in the dataset, so that stale caches are rebuilt.
DATASET_FORMAT_VERSION = 1
BUILD_INFO_FILE = "vpdml_kanji_build.json"
# Below this many glyphs, rendering in worker processes costs more than it saves.
MIN_GLYPHS_FOR_WORKERS = 2048
MAX_RENDER_WORKERS = 4


def candidate_kanji(
    coverage: Sequence[frozenset[int]], max_classes: int = MAX_CLASSES, seed: int = CLASS_SUBSET_SEED
) -> list[int]:
    """Code points every font maps, sorted; a seeded subset of ``max_classes`` of them when there are more.

    The subset is ``numpy.random.default_rng(seed).choice`` over the sorted list (then sorted again), not a
    prefix: the block is ordered by radical, so a prefix would hold the first radicals' kanji only.
    """
    common = sorted(frozenset.intersection(*coverage)) if coverage else []
    if len(common) <= max_classes:
        return common
    chosen = np.random.default_rng(seed).choice(len(common), size=max_classes, replace=False)
    return [common[index] for index in sorted(chosen.tolist())]


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedGlyph:
    """One font's drawing of one kanji: PNG bytes at the stored size, grey pixels at ``COMPARISON_SIZE``."""

    png: bytes
    reference: np.ndarray


# (font key, font file bytes, code points, stored image size)
FontTask = tuple[str, bytes, tuple[int, ...], int]


def render_em(image_size: int) -> int:
    """Em size (px) glyphs are rasterised at for ``image_size`` images: at least 2x supersampling."""
    return max(REFERENCE_EM, 2 * image_size)


def load_font(data: bytes, em: int, key: str) -> ImageFont.FreeTypeFont:
    """Pillow's FreeType font at ``em`` px, with the basic layout (no raqm: the same pixels everywhere)."""
    try:
        return ImageFont.truetype(io.BytesIO(data), size=em, layout_engine=ImageFont.Layout.BASIC)
    except OSError as error:
        raise KanjiDatasetError(f"FreeType cannot open the {key} font ({error}).") from error


def glyph_ink(font: ImageFont.FreeTypeFont, codepoint: int) -> Image.Image | None:
    """The glyph's ink (white on black, cropped to its bounding box), or ``None`` when it draws nothing.

    The canvas is the glyph's own bounding box (FreeType's, plus a pixel), not the em square, so a design that
    reaches outside its em box (brush strokes, swashes) is drawn whole instead of clipped.
    """
    character = chr(codepoint)
    left, top, right, bottom = font.getbbox(character, anchor="mm")
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), character, font=font, fill=255, anchor="mm")
    box = canvas.getbbox()
    if box is None or canvas.getextrema()[1] < BLANK_INK_LEVEL:
        return None
    return canvas.crop(box)


def fit_on_square(ink: Image.Image, size: int) -> Image.Image:
    """Black ink on a white ``size`` square: the longer side of the ink box fills it less the margins.

    Scaling by the ink box (not the em box) makes a kanji the same size in every font: designs differ a lot
    in how much of the em they fill (Dela Gothic's glyphs are much larger than Klee One's).
    """
    margin = max(1, round(size * MARGIN_FRACTION))
    scale = (size - 2 * margin) / max(ink.size)
    width, height = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    square = Image.new("L", (size, size), 0)
    square.paste(
        ink.resize((width, height), Image.Resampling.LANCZOS), ((size - width) // 2, (size - height) // 2)
    )
    return ImageOps.invert(square)


def render_font(task: FontTask) -> list[RenderedGlyph | None]:
    """One font's glyphs for the given code points (``None`` where blank), stored and comparison sizes."""
    key, data, codepoints, image_size = task
    reference_font = load_font(data, REFERENCE_EM, key)
    stored_em = render_em(image_size)
    stored_font = reference_font if stored_em == REFERENCE_EM else load_font(data, stored_em, key)
    rendered: list[RenderedGlyph | None] = []
    for codepoint in codepoints:
        ink = glyph_ink(reference_font, codepoint)
        if ink is None:
            rendered.append(None)
            continue
        reference = fit_on_square(ink, COMPARISON_SIZE)
        if image_size == COMPARISON_SIZE:
            image = reference
        else:  # large images from a larger rendering; a glyph cannot be blank at one size only
            stored_ink = ink if stored_font is reference_font else glyph_ink(stored_font, codepoint)
            image = fit_on_square(stored_ink if stored_ink is not None else ink, image_size)
        rendered.append(RenderedGlyph(png_bytes(image.convert("RGB")), np.asarray(reference)))
    return rendered


def _render_all(tasks: list[FontTask], show_progress: bool) -> list[list[RenderedGlyph | None]]:
    """Render every font in order; a few worker processes (one font each) when there are many glyphs."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    workers = max(1, min(available_cores(), MAX_RENDER_WORKERS, len(tasks)))
    glyphs = sum(len(codepoints) for _, _, codepoints, _ in tasks)
    progress = {"total": len(tasks), "desc": "Rendering kanji", "unit": "font", "disable": not show_progress}
    if workers == 1 or glyphs < MIN_GLYPHS_FOR_WORKERS:
        return [render_font(task) for task in tqdm(tasks, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(render_font, tasks), **progress))


# --------------------------------------------------------------------------------------------------
# Which pictures are kept, which classes are kept
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KanjiClass:
    """A kept class: its code point and its distinct pictures, each the fonts that draw it (first stored)."""

    codepoint: int
    pictures: tuple[tuple[str, ...], ...]

    @property
    def character(self) -> str:
        return chr(self.codepoint)


@dataclass(frozen=True)
class KanjiSelection:
    """Which classes are kept, and what was left out and why."""

    classes: list[KanjiClass]
    too_few_images: list[int]  # code points with fewer than MIN_IMAGES_PER_CLASS distinct pictures
    blank: dict[str, list[int]]  # font key -> code points it draws as nothing
    ambiguous: dict[str, list[list[int]]]  # font key -> sets of code points it draws as one picture


def ambiguous_glyphs(references: Sequence[np.ndarray | None]) -> list[list[int]]:
    """Sets (indices) of one font's pictures that are the same picture: two kanji it cannot tell apart.

    A font drawing two code points alike (a placeholder box, or two variants it does not distinguish) gives
    a picture that belongs to neither class, so such pictures are dropped from every class that has them.
    """
    present = [index for index, reference in enumerate(references) if reference is not None]
    if len(present) < 2:
        return []
    groups = same_picture_groups(np.stack([references[index] for index in present]))
    members: dict[int, list[int]] = {}
    for position, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(present[position])
    return [indices for indices in members.values() if len(indices) > 1]


def select_kanji_classes(
    codepoints: Sequence[int], font_keys: Sequence[str], references: Sequence[Sequence[np.ndarray | None]]
) -> KanjiSelection:
    """Drop blank and ambiguous pictures, keep one image per distinct picture, drop classes with too few.

    ``references[f][k]`` is font ``font_keys[f]``'s picture of ``codepoints[k]`` at ``COMPARISON_SIZE``
    (``None`` when blank). Two fonts derived from one design draw many kanji alike; a kept copy would be a
    relevant item at distance zero, so of each picture only the first font (in ``font_keys`` order) is kept.
    """
    usable = [list(row) for row in references]
    blank = {
        key: [codepoints[k] for k, ref in enumerate(row) if ref is None]
        for key, row in zip(font_keys, references, strict=True)
    }
    ambiguous: dict[str, list[list[int]]] = {}
    for row, key in zip(usable, font_keys, strict=True):
        sets = ambiguous_glyphs(row)
        ambiguous[key] = [[codepoints[index] for index in indices] for indices in sets]
        for index in (index for indices in sets for index in indices):
            row[index] = None
    classes, too_few = [], []
    for k, codepoint in enumerate(codepoints):
        drawn = [(key, row[k]) for key, row in zip(font_keys, usable, strict=True) if row[k] is not None]
        groups = same_picture_groups(np.stack([ref for _, ref in drawn])).tolist() if drawn else []
        pictures = ordered_groups(
            font_keys, {key: group for (key, _), group in zip(drawn, groups, strict=True)}
        )
        if len(pictures) >= MIN_IMAGES_PER_CLASS:
            classes.append(KanjiClass(codepoint, pictures))
        else:
            too_few.append(codepoint)
    return KanjiSelection(classes, too_few, blank, ambiguous)


# --------------------------------------------------------------------------------------------------
# Build and cache
# --------------------------------------------------------------------------------------------------


def kanji_dataset_dir(
    cache_dir: str | os.PathLike[str] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> Path:
    """Where the built dataset is cached (whether or not it exists yet)."""
    return built_dataset_dir(cache_dir, "kanji", DATASET_FORMAT_VERSION, image_size)


def ensure_kanji_dataset(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
    show_progress: bool = True,
) -> Dataset:
    """Build once (npm tarballs -> glyphs on white) and return the cached cross-font kanji dataset.

    Returns a ``datasets.Dataset`` with columns ``image`` (``Image``, RGB), ``label`` (``ClassLabel`` whose
    names are the kanji), ``font`` (the first font, in ``KANJI_FONTS`` order, that draws this picture),
    ``fonts`` (every font that draws it, comma-separated), ``kanji`` (the character) and ``codepoint``
    (``U+6C38``); rows are ordered by label, then font. A cached build is loaded without calling npm;
    ``force=True`` rebuilds it.
    """
    import datasets

    check_image_size(image_size)
    root = resolve_cache_dir(cache_dir)
    target = kanji_dataset_dir(root, image_size)
    if not force and is_complete_build(target, BUILD_INFO_FILE, DATASET_FORMAT_VERSION):
        return datasets.load_from_disk(str(target))

    from tqdm.auto import tqdm

    started = time.perf_counter()
    fonts = KANJI_FONTS
    tarballs = [
        fetch_font_package(root, font)
        for font in tqdm(fonts, desc="Fetching fonts", unit="font", disable=not show_progress)
    ]
    fetched = time.perf_counter()
    records, selection, statistics = _build_records(fonts, tarballs, image_size, show_progress=show_progress)
    dataset = datasets.Dataset.from_dict(
        records, features=_features([kanji.character for kanji in selection.classes])
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


def read_kanji_build_info(
    cache_dir: str | os.PathLike[str] | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> dict:
    """The record written next to a built dataset (fonts, counts, what was dropped and why, build time)."""
    path = kanji_dataset_dir(cache_dir, image_size) / BUILD_INFO_FILE
    return json.loads(path.read_text(encoding="utf-8"))


def _build_records(
    fonts: Sequence[KanjiFont], tarballs: Sequence[Path], image_size: int, *, show_progress: bool
) -> tuple[dict[str, list[Any]], KanjiSelection, dict[str, Any]]:
    """Read the fonts, render the shared kanji, select classes; return rows, selection, statistics."""
    files = [read_font_file(tarball, font) for font, tarball in zip(fonts, tarballs, strict=True)]
    facts = [read_font_facts(data, font.key) for font, data in zip(fonts, files, strict=True)]
    codepoints = candidate_kanji([fact.kanji for fact in facts], MAX_CLASSES, CLASS_SUBSET_SEED)
    if not codepoints:
        raise KanjiDatasetError(
            f"The {len(fonts)} fonts have no kanji (U+{KANJI_FIRST:04X}..U+{KANJI_LAST:04X}) in common; "
            f"coverage per font: {', '.join(f'{f.key} {len(x.kanji)}' for f, x in zip(fonts, facts, strict=True))}."
        )
    tasks = [(font.key, data, tuple(codepoints), image_size) for font, data in zip(fonts, files, strict=True)]
    rendered = _render_all(tasks, show_progress)
    keys = [font.key for font in fonts]
    references = [[glyph.reference if glyph else None for glyph in row] for row in rendered]
    selection = select_kanji_classes(codepoints, keys, references)
    if not selection.classes:
        raise KanjiDatasetError(
            f"No kanji has {MIN_IMAGES_PER_CLASS} distinct pictures in the {len(fonts)} fonts "
            f"({len(codepoints)} shared kanji, {len(selection.too_few_images)} with too few)."
        )

    glyphs = {
        (key, codepoint): glyph
        for key, row in zip(keys, rendered, strict=True)
        for codepoint, glyph in zip(codepoints, row, strict=True)
    }
    records: dict[str, list[Any]] = {
        "image": [],
        "label": [],
        "font": [],
        "fonts": [],
        "kanji": [],
        "codepoint": [],
    }
    for label, kanji in enumerate(selection.classes):
        for drawn_by in kanji.pictures:
            glyph = glyphs[drawn_by[0], kanji.codepoint]
            assert glyph is not None  # a kept picture was drawn
            records["image"].append({"bytes": glyph.png, "path": None})
            records["label"].append(label)
            records["font"].append(drawn_by[0])
            records["fonts"].append(",".join(drawn_by))
            records["kanji"].append(kanji.character)
            records["codepoint"].append(f"U+{kanji.codepoint:04X}")
    statistics = _statistics(fonts, facts, tarballs, codepoints, selection)
    return records, selection, statistics


def _statistics(
    fonts: Sequence[KanjiFont],
    facts: Sequence[FontFacts],
    tarballs: Sequence[Path],
    codepoints: Sequence[int],
    selection: KanjiSelection,
) -> dict[str, Any]:
    per_class = [len(kanji.pictures) for kanji in selection.classes]
    stored = [drawn_by[0] for kanji in selection.classes for drawn_by in kanji.pictures]
    repeated = [key for kanji in selection.classes for drawn_by in kanji.pictures for key in drawn_by[1:]]
    return {
        "fonts": [
            {
                "key": font.key,
                "package": font.package.spec,
                "sha256": font.package.sha256,
                "tarball_bytes": tarball.stat().st_size,
                "file": font.member,
                "license": font.package.license,
                "license_url": fact.license_url,
                "copyright": fact.copyright,
                "family": fact.family,
                "font_version": fact.version,
                "style": font.style,
                "kanji_in_font": len(fact.kanji),
            }
            for font, fact, tarball in zip(fonts, facts, tarballs, strict=True)
        ],
        "download_bytes": sum(tarball.stat().st_size for tarball in tarballs),
        "kanji_in_every_font": len(frozenset.intersection(*(fact.kanji for fact in facts))),
        "candidate_classes": len(codepoints),
        "candidate_images": len(codepoints) * len(fonts),
        "blank_glyphs": {key: "".join(map(chr, points)) for key, points in selection.blank.items() if points},
        "ambiguous_pictures_dropped": {
            key: ["".join(map(chr, points)) for points in sets]
            for key, sets in selection.ambiguous.items()
            if sets
        },
        "same_as_an_earlier_font_dropped": {font.key: repeated.count(font.key) for font in fonts},
        "classes_dropped_too_few_distinct_images": "".join(map(chr, selection.too_few_images)),
        "images_per_class": {
            "min": min(per_class),
            "median": float(np.median(per_class)),
            "max": max(per_class),
            "counts": {str(size): per_class.count(size) for size in sorted(set(per_class))},
        },
        "images_per_font": {font.key: stored.count(font.key) for font in fonts},
    }


def _features(class_names: list[str]) -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "font": datasets.Value("string"),
            "fonts": datasets.Value("string"),
            "kanji": datasets.Value("string"),
            "codepoint": datasets.Value("string"),
        }
    )


def _write_build_info(
    directory: Path,
    num_images: int,
    image_size: int,
    timings: dict[str, float],
    selection: KanjiSelection,
    statistics: dict[str, Any],
) -> None:
    info = {
        "format_version": DATASET_FORMAT_VERSION,
        "num_classes": len(selection.classes),
        "num_images": num_images,
        "image_size": image_size,
        "comparison_size": COMPARISON_SIZE,
        "margin_fraction": MARGIN_FRACTION,
        "max_classes": MAX_CLASSES,
        "class_subset_seed": CLASS_SUBSET_SEED,
        "min_images_per_class": MIN_IMAGES_PER_CLASS,
        "same_picture_tolerance": SAME_PICTURE_TOLERANCE,
        **statistics,
        "timings_s": {name: round(seconds, 2) for name, seconds in timings.items()},
    }
    text = json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    (directory / BUILD_INFO_FILE).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Class-disjoint splits
# --------------------------------------------------------------------------------------------------


def kanji_splits(
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
    """Class-disjoint ``DMLSplits`` (name ``"kanji"``): train on half the kanji, test on the other half.

    ``dataset`` defaults to :func:`ensure_kanji_dataset` (built on first use). The class split is the other
    offline benchmarks' (:func:`vpdml.offline.class_split.split_emoji_classes`): a seeded shuffle cut in
    halves, validation held out of the training half first, subsets taken as prefixes. Each split gets
    contiguous labels; ``original_label`` keeps the kanji class id (``ClassLabel`` names are the kanji).
    """
    if dataset is None:
        dataset = ensure_kanji_dataset(cache_dir, image_size=image_size, show_progress=show_progress)
    num_classes = dataset.features["label"].num_classes
    train, validation, test = split_emoji_classes(
        num_classes, seed, num_train_classes, num_test_classes, validation_classes
    )
    return DMLSplits(
        name="kanji",
        train=select_dataset_classes(dataset, train),
        test=select_dataset_classes(dataset, test),
        validation=select_dataset_classes(dataset, validation) if validation else None,
    )
