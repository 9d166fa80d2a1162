"""The cross-style icon dataset: package layout, same-picture grouping, class selection, build, cache, splits.

Most tests build from a small synthetic tarball laid out like ``@material-design-icons/svg`` (the npm fetch
is monkeypatched), so they need cairosvg but neither npm nor the network. The real-package tests need npm the
first time (or a build already cached under ``$VPDML_CACHE``, default ``~/.cache/vpdml``) and are skipped
otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vpdml.offline import icons
from vpdml.offline.icons import (
    ICON_PACKAGE,
    ICON_STYLES,
    IconDatasetError,
    candidate_icons,
    distinct_pictures,
    ensure_icon_dataset,
    fetch_icon_package,
    icon_dataset_dir,
    icon_splits,
    read_icon_build_info,
    read_icon_svgs,
    same_picture_groups,
    select_icon_classes,
)

pytest.importorskip("cairosvg")

# ---------------------------------------------------------------------------------------------------
# A synthetic package: black rectangles on a 24-unit canvas, like Material's 24 x 24 viewBox
# ---------------------------------------------------------------------------------------------------


def _svg(*shapes: str) -> bytes:
    body = "".join(shapes)
    header = '<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24">'
    return f"{header}{body}</svg>".encode()


def _rect(x: float, y: float, width: float = 3, height: float = 2, extra: str = "") -> str:
    return f'<rect x="{x}" y="{y}" width="{width}" height="{height}"{extra}/>'


def _cell(row: int, column: int, dx: float = 0.0) -> bytes:
    """A picture of its own: a small rectangle in grid cell (row, column), nudged right by ``dx`` units."""
    return _svg(_rect(1 + 4.5 * column + dx, 1 + 2.5 * row))


def _distinct(row: int, styles: tuple[str, ...] = ICON_STYLES) -> dict[str, bytes]:
    return {style: _cell(row, column) for column, style in enumerate(styles)}


FRAME = '<rect x="9" y="9" width="6" height="6" fill="none" stroke="#000"/>'
SYNTHETIC_ICONS: dict[str, dict[str, bytes]] = {
    "alpha": _distinct(0),  # five distinct pictures
    # filled and sharp are one picture (identical files): 4 images, the sharp one dropped
    "beta": {**_distinct(1), "sharp": _cell(1, 0)},
    "gamma": dict.fromkeys(ICON_STYLES, _cell(2, 0)),  # one picture in all styles: dropped
    # two pictures only: dropped
    "delta": {**dict.fromkeys(ICON_STYLES[:3], _cell(3, 0)), **dict.fromkeys(ICON_STYLES[3:], _cell(3, 1))},
    # four pictures (filled = sharp); its round picture is zeta's outlined one, and zeta has five: eps goes
    "eps": {**_distinct(4), "sharp": _cell(4, 0)},
    "zeta": {**_distinct(5), "outlined": _cell(4, 2)},
    # outlined is filled nudged by 0.05 units (0.13 px at 64 px): the same picture within tolerance
    "eta": {**_distinct(6), "outlined": _cell(6, 0, dx=0.05)},
    # two-tone is outlined plus a 30% tint: a different picture (the tint is 77 levels from white)
    "theta": {
        "filled": _svg(_rect(9, 9, 6, 6)),
        "outlined": _svg(FRAME),
        "round": _svg(_rect(9, 9, 6, 6, ' rx="1.5"')),
        "sharp": _svg(_rect(8, 8, 8, 8)),
        "two-tone": _svg(FRAME, _rect(9.5, 9.5, 5, 5, ' opacity=".3"')),
    },
    "iota": _distinct(7, ICON_STYLES[:4]),  # no two-tone file: four images
    "kappa": _distinct(8, ICON_STYLES[:2]),  # two files only: not a candidate
}
KEPT = {"alpha": 5, "beta": 4, "eta": 4, "iota": 4, "theta": 5, "zeta": 5}


def _write_tarball(
    path: Path, icon_files: dict[str, dict[str, bytes]], extra: dict[str, bytes] | None = None
) -> Path:
    members = {
        f"package/{style}/{name}.svg": svg
        for name, styles in icon_files.items()
        for style, svg in styles.items()
    }
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _use_tarball(monkeypatch: pytest.MonkeyPatch, tarball: Path) -> list[Path]:
    """Make the build read ``tarball`` instead of fetching the real package; returns the list of fetches."""
    calls: list[Path] = []

    def fake_fetch(cache_dir: Path) -> Path:
        calls.append(cache_dir)
        return tarball

    monkeypatch.setattr(icons, "fetch_icon_package", fake_fetch)
    return calls


@pytest.fixture(scope="module")
def synthetic_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = {
        "package/package.json": b"{}",
        "package/README.md": b"# icons",
        "package/other/alpha.svg": _cell(0, 0),  # not a style folder
        "package/filled/nested/alpha.svg": _cell(0, 1),  # not directly in a style folder
    }
    return _write_tarball(tmp_path_factory.mktemp("npm") / "icons.tgz", SYNTHETIC_ICONS, extra)


@pytest.fixture(scope="module")
def built(synthetic_tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The synthetic package built once at 32 px into a fresh cache: ``(cache_dir, dataset)``."""
    cache_dir = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_tarball(monkeypatch, synthetic_tarball)
        dataset = ensure_icon_dataset(cache_dir, image_size=32, show_progress=False)
    return cache_dir, dataset


# ---------------------------------------------------------------------------------------------------
# Package and layout
# ---------------------------------------------------------------------------------------------------


def test_pinned_package_and_scoped_tarball_name() -> None:
    assert ICON_PACKAGE.spec == "@material-design-icons/svg@0.14.15"
    assert ICON_PACKAGE.tarball_name == "material-design-icons-svg-0.14.15.tgz"  # what `npm pack` writes
    assert len(ICON_PACKAGE.sha256) == 64 and int(ICON_PACKAGE.sha256, 16) >= 0
    assert ICON_STYLES == ("filled", "outlined", "round", "sharp", "two-tone")


def test_layout_reads_style_folders_only(synthetic_tarball: Path) -> None:
    found = read_icon_svgs(synthetic_tarball)
    assert set(found) == set(SYNTHETIC_ICONS)
    assert found["alpha"] == SYNTHETIC_ICONS["alpha"]  # neither package/other/ nor filled/nested/ leaked in
    assert set(found["iota"]) == set(ICON_STYLES[:4])
    assert candidate_icons(found) == sorted(set(SYNTHETIC_ICONS) - {"kappa"})


# ---------------------------------------------------------------------------------------------------
# Same pictures
# ---------------------------------------------------------------------------------------------------


def _changed(picture: np.ndarray, pixel: tuple[int, int], value: int) -> np.ndarray:
    copy = picture.copy()
    copy[pixel] = value
    return copy


def test_same_picture_groups_use_the_tolerance_and_connect_chains() -> None:
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    pictures = np.stack(
        [
            white,  # 0
            _changed(white, (0, 0), 255 - 64),  # 1: 64 levels from 0 -> same
            _changed(white, (5, 5), 255 - 65),  # 2: 65 levels from 0 -> different
            _changed(white, (5, 5), 255 - 65),  # 3: exact copy of 2
            _changed(white, (0, 0), 255 - 128),  # 4: 128 from 0 but 64 from 1 -> same group by the chain
            np.zeros_like(white),  # 5: black
        ]
    )
    assert same_picture_groups(pictures).tolist() == [0, 0, 2, 2, 0, 5]
    assert same_picture_groups(pictures, tolerance=0).tolist() == [0, 1, 2, 2, 4, 5]


def test_uniform_shift_at_exactly_the_tolerance_is_not_missed_by_the_block_screen() -> None:
    shades = [100, 164, 165, 229]  # consecutive steps of 64, 1, 64
    pictures = np.stack([np.full((64, 64, 3), shade, dtype=np.uint8) for shade in shades])
    assert same_picture_groups(pictures).tolist() == [0, 0, 0, 0]
    assert same_picture_groups(pictures, tolerance=63).tolist() == [0, 1, 1, 3]


def test_distinct_pictures_follow_style_order() -> None:
    groups = {"two-tone": 7, "sharp": 3, "outlined": 7, "filled": 3, "round": 5}
    assert distinct_pictures(groups) == (("filled", "sharp"), ("outlined", "two-tone"), ("round",))


def test_selection_drops_degenerate_classes_and_keeps_one_name_per_shared_picture() -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    style_groups = [
        {"filled": 1, "outlined": 2, "round": 3},  # a: 3 pictures, shares 3 with b
        {"filled": 3, "outlined": 4, "round": 5, "sharp": 6},  # b: 4 pictures -> kept over a
        {"filled": 7, "outlined": 7, "round": 7, "sharp": 8},  # c: 2 pictures -> too few
        {"filled": 9, "outlined": 10, "round": 11},  # d: ties with e -> first name kept
        {"filled": 12, "outlined": 13, "round": 9},  # e
        {"filled": 8, "outlined": 14, "round": 15},  # f: shares 8 with c only, and c is gone -> kept
    ]
    selection = select_icon_classes(names, style_groups)
    assert [(icon.name, len(icon.pictures)) for icon in selection.classes] == [("b", 4), ("d", 3), ("f", 3)]
    assert selection.too_few_styles == ["c"]
    assert selection.aliases == {"a": "b", "e": "d"}


# ---------------------------------------------------------------------------------------------------
# Building from the synthetic package
# ---------------------------------------------------------------------------------------------------


def test_build_keeps_distinct_styles_of_unambiguous_classes(built: tuple[Path, object]) -> None:
    _, dataset = built
    assert dataset.column_names == ["image", "label", "style", "styles", "name"]
    names = dataset.features["label"].names
    assert names == sorted(KEPT)
    labels = np.asarray(dataset["label"])
    assert np.bincount(labels).tolist() == [KEPT[name] for name in names]
    assert labels.tolist() == sorted(labels.tolist())  # rows ordered by label, then style
    rows = list(zip(dataset["name"], dataset["style"], dataset["styles"], strict=True))
    assert [row[1:] for row in rows if row[0] == "beta"] == [
        ("filled", "filled,sharp"),
        ("outlined", "outlined"),
        ("round", "round"),
        ("two-tone", "two-tone"),
    ]
    assert [row[2] for row in rows if row[0] == "eta"] == ["filled,outlined", "round", "sharp", "two-tone"]
    assert [row[1] for row in rows if row[0] == "theta"] == list(ICON_STYLES)
    assert [row[1] for row in rows if row[0] == "iota"] == list(ICON_STYLES[:4])
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert pixels[-1, -1].tolist() == [255, 255, 255]  # transparent background composited on white
    assert pixels.min() == 0  # black ink


def test_build_info_records_what_was_dropped(built: tuple[Path, object]) -> None:
    cache_dir, dataset = built
    info = read_icon_build_info(cache_dir, image_size=32)
    assert (info["num_classes"], info["num_images"]) == (6, dataset.num_rows) == (6, 27)
    assert info["source"]["package"] == ICON_PACKAGE.spec and info["source"]["sha256"] == ICON_PACKAGE.sha256
    selection = info["selection"]
    assert selection["candidate_classes"] == 9
    assert selection["candidate_images"] == 5 * 8 + 4
    assert selection["classes_dropped_too_few_distinct_styles"] == 2  # gamma, delta
    assert selection["aliases"] == {"eps": "zeta"}
    assert selection["images_per_class"] == {"4": 3, "5": 3}
    assert selection["same_as_an_earlier_style_dropped"] == {
        "filled": 0,
        "outlined": 1,
        "round": 0,
        "sharp": 1,
        "two-tone": 0,
    }


def test_cached_build_is_reused_without_fetching(
    built: tuple[Path, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, dataset = built

    def no_fetch(cache_dir: Path) -> Path:
        raise AssertionError("a cached build must not fetch the package")

    monkeypatch.setattr(icons, "fetch_icon_package", no_fetch)
    again = ensure_icon_dataset(cache_dir, image_size=32, show_progress=False)
    assert again.num_rows == dataset.num_rows and again["styles"] == dataset["styles"]
    assert icon_dataset_dir(cache_dir, 32).name == "icons-v1-32px"


def test_other_sizes_are_separate_builds_with_the_same_classes(
    built: tuple[Path, object], synthetic_tarball: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, dataset = built
    fetches = _use_tarball(monkeypatch, synthetic_tarball)
    larger = ensure_icon_dataset(cache_dir, image_size=64, show_progress=False)
    assert len(fetches) == 1 and larger[0]["image"].size == (64, 64)
    assert larger.features["label"].names == dataset.features["label"].names
    assert larger["styles"] == dataset["styles"]  # pictures are compared at one size, whatever is stored
    rebuilt = ensure_icon_dataset(cache_dir, image_size=64, force=True, show_progress=False)
    assert len(fetches) == 2 and rebuilt.num_rows == larger.num_rows


# ---------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------


def _toy_dataset(num_classes: int, per_class: int = 3):
    import datasets
    from PIL import Image

    names = [f"icon_{index:02d}" for index in range(num_classes)]
    image = Image.new("RGB", (4, 4), "white")
    rows = [(label, style) for label in range(num_classes) for style in ICON_STYLES[:per_class]]
    records = {
        "image": [image] * len(rows),
        "label": [label for label, _ in rows],
        "style": [style for _, style in rows],
        "styles": [style for _, style in rows],
        "name": [names[label] for label, _ in rows],
    }
    return datasets.Dataset.from_dict(records, features=icons._features(names))


def test_icon_splits_are_class_disjoint_and_deterministic() -> None:
    dataset = _toy_dataset(40)
    splits = icon_splits(seed=1, num_test_classes=15, validation_classes=4, dataset=dataset)
    assert splits.name == "icons"
    original = {
        name: set(split["original_label"])
        for name, split in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
    }
    assert [len(original[name]) for name in ("train", "validation", "test")] == [16, 4, 15]
    assert not (original["train"] & original["test"]) and not (
        original["validation"] & (original["train"] | original["test"])
    )
    assert splits.train.num_rows == 16 * 3 and sorted(set(splits.train["label"])) == list(range(16))
    same = icon_splits(seed=1, num_test_classes=15, validation_classes=4, dataset=dataset)
    assert set(same.test["original_label"]) == original["test"]
    other = icon_splits(seed=2, num_test_classes=15, validation_classes=4, dataset=dataset)
    assert set(other.test["original_label"]) != original["test"]
    assert icon_splits(seed=1, dataset=dataset).validation is None


def test_icon_splits_of_the_synthetic_build(built: tuple[Path, object]) -> None:
    _, dataset = built
    splits = icon_splits(seed=0, dataset=dataset)
    assert len(set(splits.train["label"])) == 3 == len(set(splits.test["label"]))
    assert splits.train.num_rows + splits.test.num_rows == dataset.num_rows
    with pytest.raises(ValueError, match="train classes"):
        icon_splits(seed=0, num_train_classes=4, dataset=dataset)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_bad_image_size_is_refused(tmp_path: Path) -> None:
    for bad in (8, 2048, 64.0, True):
        with pytest.raises(ValueError, match="image_size"):
            ensure_icon_dataset(tmp_path, image_size=bad)  # type: ignore[arg-type]


def test_corrupt_tarball_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "broken.tgz"
    garbage.write_bytes(b"\x1f\x8b this is not gzip data")
    _use_tarball(monkeypatch, garbage)
    with pytest.raises(IconDatasetError, match=r"not a readable \.tgz.*delete it"):
        ensure_icon_dataset(tmp_path / "cache", show_progress=False)
    assert not icon_dataset_dir(tmp_path / "cache").exists()


def test_tarball_without_the_layout_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = _write_tarball(tmp_path / "other.tgz", {}, {"package/icons/home.svg": _cell(0, 0)})
    _use_tarball(monkeypatch, tarball)
    with pytest.raises(IconDatasetError, match=r"no icon drawn in 3 of the styles.*layout changed"):
        ensure_icon_dataset(tmp_path / "cache", show_progress=False)


def test_unreadable_svg_names_the_icon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = {**SYNTHETIC_ICONS, "broken": {**_distinct(9), "round": b"<svg this is not xml"}}
    _use_tarball(monkeypatch, _write_tarball(tmp_path / "broken.tgz", broken))
    with pytest.raises(IconDatasetError, match=r"icon 'broken' \(round\)"):
        ensure_icon_dataset(tmp_path / "cache", show_progress=False)


def _fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_npm = fake_bin / "npm"
    fake_npm.write_text(f"#!/bin/sh\n{script}\n")
    fake_npm.chmod(fake_npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")


def test_wrong_checksum_from_npm_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_npm(tmp_path, monkeypatch, f"printf 'not the pinned tarball' > {ICON_PACKAGE.tarball_name}")
    with pytest.raises(
        IconDatasetError, match=rf"{ICON_PACKAGE.spec} from npm has sha256 .*expected {ICON_PACKAGE.sha256}"
    ):
        fetch_icon_package(tmp_path / "cache")
    assert not (tmp_path / "cache" / "npm" / ICON_PACKAGE.tarball_name).exists()


def test_failing_npm_reports_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_npm(tmp_path, monkeypatch, "echo 'npm error 404 Not Found' >&2\nexit 1")
    with pytest.raises(IconDatasetError, match="404 Not Found"):
        fetch_icon_package(tmp_path / "cache")


def test_missing_npm_gives_a_clear_error_unless_the_tarball_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(IconDatasetError, match=r"npm is not on PATH.*copy the tarball to"):
        fetch_icon_package(tmp_path)
    tarball = _write_tarball(tmp_path / "pinned.tgz", {"alpha": _distinct(0)})

    pinned = icons.ScopedNpmPackage(
        "@test/icons", "1.0.0", hashlib.sha256(tarball.read_bytes()).hexdigest(), "none"
    )
    cached = tmp_path / "npm" / pinned.tarball_name
    cached.parent.mkdir()
    shutil.copy(tarball, cached)
    assert cached.name == "test-icons-1.0.0.tgz"
    assert fetch_icon_package(tmp_path, pinned) == cached


# ---------------------------------------------------------------------------------------------------
# The real package (npm, or a cached build)
# ---------------------------------------------------------------------------------------------------


def _real_build_available() -> bool:
    return shutil.which("npm") is not None or (icon_dataset_dir() / icons.BUILD_INFO_FILE).is_file()


@pytest.fixture(scope="session")
def real_icons() -> object:
    if not _real_build_available():
        pytest.skip("npm is not installed and no icon dataset is cached: cannot build it")
    return ensure_icon_dataset(show_progress=False)


@pytest.mark.slow
def test_real_dataset_has_about_1450_classes_of_three_to_five_styles(real_icons) -> None:
    assert real_icons.column_names == ["image", "label", "style", "styles", "name"]
    names = real_icons.features["label"].names
    assert 1400 <= len(names) <= 1500 and names == sorted(names)
    labels = np.asarray(real_icons["label"])
    per_class = np.bincount(labels, minlength=len(names))
    assert per_class.min() == 3 and per_class.max() == 5
    assert set(real_icons["style"]) == set(ICON_STYLES)
    first = real_icons[0]
    assert (first["name"], first["style"]) == ("10k", "filled")
    assert first["image"].mode == "RGB" and first["image"].size == (64, 64)
    info = read_icon_build_info()
    assert info["source"]["sha256"] == ICON_PACKAGE.sha256
    assert info["selection"]["candidate_classes"] == 2122
    assert info["selection"]["aliases"]["alarm"] == "access_alarm"


@pytest.mark.slow
def test_real_cached_dataset_loads_without_npm(real_icons, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> subprocess.CompletedProcess:
        raise AssertionError("npm must not run when the dataset is cached")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert ensure_icon_dataset(show_progress=False).num_rows == real_icons.num_rows


@pytest.mark.slow
def test_real_icon_splits_halve_the_classes(real_icons) -> None:
    splits = icon_splits(seed=0, validation_classes=50, dataset=real_icons)
    num_classes = real_icons.features["label"].num_classes
    train = set(splits.train["original_label"])
    test = set(splits.test["original_label"])
    validation = set(splits.validation["original_label"])
    assert len(test) == num_classes - num_classes // 2 and len(train) + len(validation) == num_classes // 2
    assert not (train & test) and not (validation & (train | test))
    assert json.loads(json.dumps(read_icon_build_info()))["num_classes"] == num_classes
