"""The cross-font kanji dataset: fonts and their cmaps, rendering, duplicate handling, build, cache, splits.

Most tests build from small synthetic font packages: TrueType fonts made with ``fontTools.fontBuilder`` whose
"kanji" are patterns of squares, packed like ``@expo-google-fonts/<family>`` tarballs (the npm fetch and the
pinned font list are monkeypatched), so they need neither npm nor the network. The real-dataset tests run
only when the real build is cached (``$VPDML_CACHE``, default ``~/.cache/vpdml``): building it downloads
178 MB of fonts, which a test run should not do on its own.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vpdml.offline import kanji, kanji_fonts
from vpdml.offline.kanji import (
    KanjiDatasetError,
    ambiguous_glyphs,
    candidate_kanji,
    ensure_kanji_dataset,
    kanji_dataset_dir,
    kanji_splits,
    read_kanji_build_info,
    select_kanji_classes,
)
from vpdml.offline.kanji_fonts import (
    KANJI_FONTS,
    KanjiFont,
    fetch_font_package,
    read_font_facts,
    read_font_file,
)
from vpdml.offline.npm import ScopedNpmPackage

# ---------------------------------------------------------------------------------------------------
# Synthetic fonts: each "glyph" is a pattern of squares on a 4 x 4 grid of a 1000-unit em
# ---------------------------------------------------------------------------------------------------

CORNERS = ((0, 0), (3, 3))  # in every pattern, so the ink box (and the scaling) is the whole grid
INNER = [(row, column) for row in range(4) for column in range(4) if (row, column) not in CORNERS]
YI, DING, QI, WAN, SAN, SHANG, XIA = 0x4E00, 0x4E01, 0x4E03, 0x4E07, 0x4E09, 0x4E0A, 0x4E0B
OUTSIDE = (0x0041, 0x3042, 0x20000)  # Latin A, hiragana a, CJK extension B: never classes


def _pattern(number: int) -> list[tuple[int, int]]:
    """The corner cells plus the inner cells picked by the bits of ``number``: a picture of its own."""
    return [*CORNERS, *(cell for bit, cell in enumerate(INNER) if number >> bit & 1)]


def _font_bytes(family: str, glyphs: dict[int, list[tuple[int, int]] | None], scale: int = 1) -> bytes:
    """A TrueType font mapping each code point to its cells (``None``: a glyph that draws nothing)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = {point: f"uni{point:04X}" for point in glyphs}
    builder = FontBuilder(unitsPerEm=1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", *names.values()])
    builder.setupCharacterMap(names)
    outlines, metrics = {}, {}
    for name, cells in [(".notdef", None), *((names[point], cells) for point, cells in glyphs.items())]:
        pen = TTGlyphPen(None)
        for row, column in cells or ():
            x, y = 100 + 200 * column * scale, 700 - 200 * row * scale
            pen.moveTo((x, y))
            pen.lineTo((x, y + 200 * scale))
            pen.lineTo((x + 200 * scale, y + 200 * scale))
            pen.lineTo((x + 200 * scale, y))
            pen.closePath()
        outlines[name] = pen.glyph()
        metrics[name] = (1000, 100 if cells else 0)
    builder.setupGlyf(outlines)
    builder.setupHorizontalMetrics(metrics)
    builder.setupHorizontalHeader(ascent=880, descent=-120)
    builder.setupNameTable(
        {
            "familyName": family,
            "styleName": "Regular",
            "version": "Version 1.000",
            "copyright": f"Copyright 2026 The {family} Authors",
            "licenseInfoURL": "https://openfontlicense.org",
        }
    )
    builder.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    builder.setupPost()
    buffer = io.BytesIO()
    builder.save(buffer)
    return buffer.getvalue()


def _family(index: int, points: tuple[int, ...]) -> dict[int, list[tuple[int, int]] | None]:
    return {point: _pattern(1 + 16 * index + position) for position, point in enumerate(points)}


ALL = (YI, DING, QI, WAN, SAN, SHANG, XIA)
SHARED_XIA = _pattern(2000)  # alpha, beta and gamma draw 下 alike
SYNTHETIC_FONTS: dict[str, dict[int, list[tuple[int, int]] | None]] = {
    "alpha": {**_family(0, ALL), XIA: SHARED_XIA, OUTSIDE[0]: _pattern(3000)},
    # 丁 is alpha's picture: dropped as a duplicate of an earlier font
    "beta": {**_family(1, ALL), DING: _family(0, ALL)[DING], XIA: SHARED_XIA},
    # 万 draws nothing (blank); 七 and 三 are one picture (ambiguous, dropped from both classes)
    "gamma": {**_family(2, ALL), WAN: None, SAN: _family(2, ALL)[QI], XIA: SHARED_XIA},
    "delta": _family(3, (YI, DING, QI, WAN, SAN, XIA)),  # no 上: 上 is not in every font
    "epsilon": {**_family(4, ALL), **dict.fromkeys(OUTSIDE, _pattern(3001))},
}
# 下 has three distinct pictures (alpha = beta = gamma, delta, epsilon): fewer than 4, dropped
KEPT = {YI: 5, DING: 4, QI: 4, WAN: 4, SAN: 4}
MIN_IMAGES = 4


def _member(key: str) -> str:
    return f"package/400Regular/{key.title()}_400Regular.ttf"


def _write_package(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _pinned(key: str, tarball: Path | None = None, member: str | None = None) -> KanjiFont:
    sha256 = hashlib.sha256(tarball.read_bytes()).hexdigest() if tarball else "0" * 64
    package = ScopedNpmPackage(f"@test-fonts/{key}", "1.0.0", sha256, "OFL-1.1")
    return KanjiFont(key, package, member or _member(key), "test")


def _use_packages(monkeypatch: pytest.MonkeyPatch, tarballs: dict[str, Path]) -> list[str]:
    """Build from ``tarballs`` (font key -> .tgz) instead of the real fonts; returns the fetched keys."""
    fetched: list[str] = []

    def fake_fetch(cache_dir: Path, font: KanjiFont) -> Path:
        fetched.append(font.key)
        return tarballs[font.key]

    monkeypatch.setattr(kanji, "KANJI_FONTS", tuple(_pinned(key, tarballs[key]) for key in tarballs))
    monkeypatch.setattr(kanji, "fetch_font_package", fake_fetch)
    monkeypatch.setattr(kanji, "MIN_IMAGES_PER_CLASS", MIN_IMAGES)
    return fetched


@pytest.fixture(scope="module")
def synthetic_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("npm")
    return {
        key: _write_package(
            folder / f"{key}.tgz",
            {
                "package/package.json": b"{}",
                "package/LICENSE_FONT": b"SIL Open Font License 1.1",
                _member(key): _font_bytes(key.title(), glyphs),
                f"package/700Bold/{key.title()}_700Bold.ttf": _font_bytes(key.title(), {YI: _pattern(5)}),
            },
        )
        for key, glyphs in SYNTHETIC_FONTS.items()
    }


@pytest.fixture(scope="module")
def built(
    synthetic_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, object]:
    """The synthetic fonts built once at 32 px into a fresh cache: ``(cache_dir, dataset)``."""
    cache_dir = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_packages(monkeypatch, synthetic_packages)
        dataset = ensure_kanji_dataset(cache_dir, image_size=32, show_progress=False)
    return cache_dir, dataset


# ---------------------------------------------------------------------------------------------------
# The pinned fonts, their files and cmaps
# ---------------------------------------------------------------------------------------------------


def test_pinned_fonts_are_distinct_scoped_packages_with_one_file_each() -> None:
    assert 20 <= len(KANJI_FONTS) <= 28
    keys = [font.key for font in KANJI_FONTS]
    assert keys == sorted(set(keys))
    for font in KANJI_FONTS:
        assert font.package.name == f"@expo-google-fonts/{font.key}"
        assert font.package.tarball_name == f"expo-google-fonts-{font.key}-{font.package.version}.tgz"
        assert len(font.package.sha256) == 64 and int(font.package.sha256, 16) >= 0
        assert font.member.startswith("package/") and font.member.endswith("_400Regular.ttf")
        assert font.package.license in {"OFL-1.1", "Apache-2.0"}
    assert {"noto-sans-jp", "noto-serif-jp", "dotgothic16", "klee-one"} <= set(keys)


def test_font_facts_read_the_kanji_block_and_the_name_table(synthetic_packages: dict[str, Path]) -> None:
    font = _pinned("epsilon")
    facts = read_font_facts(read_font_file(synthetic_packages["epsilon"], font), "epsilon")
    assert facts.kanji == frozenset(ALL)  # not A, not hiragana, not extension B
    assert (facts.family, facts.version) == ("Epsilon", "Version 1.000")
    assert facts.license_url == "https://openfontlicense.org" and "Epsilon Authors" in facts.copyright


def test_candidates_are_the_intersection_and_a_seeded_subset_when_too_many() -> None:
    coverage = [frozenset(range(100)), frozenset(range(10, 120)), frozenset(range(5, 95))]
    assert candidate_kanji(coverage, max_classes=1000) == list(range(10, 95))
    subset = candidate_kanji(coverage, max_classes=20, seed=3)
    assert len(subset) == 20 and subset == sorted(subset) and set(subset) <= set(range(10, 95))
    assert subset == candidate_kanji(coverage, max_classes=20, seed=3)
    assert subset != candidate_kanji(coverage, max_classes=20, seed=4)
    assert subset != list(range(10, 30))  # not a prefix: the block is ordered by radical
    assert candidate_kanji([], max_classes=5) == []


# ---------------------------------------------------------------------------------------------------
# Duplicates and ambiguity
# ---------------------------------------------------------------------------------------------------


def _picture(cells: list[tuple[int, int]]) -> np.ndarray:
    picture = np.full((64, 64), 255, dtype=np.uint8)
    for row, column in cells:
        picture[16 * row : 16 * row + 16, 16 * column : 16 * column + 16] = 0
    return picture


def test_ambiguous_glyphs_are_one_fonts_pictures_shared_by_several_kanji() -> None:
    one, two = _picture([(0, 0)]), _picture([(1, 1)])
    assert ambiguous_glyphs([one, two, None, one.copy(), two, _picture([(2, 2)])]) == [[0, 3], [1, 4]]
    assert ambiguous_glyphs([one, None]) == []


def test_selection_drops_blank_ambiguous_and_repeated_pictures_then_thin_classes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kanji, "MIN_IMAGES_PER_CLASS", 2)
    a, b, c, d = (_picture([(index, index)]) for index in range(4))
    references = [
        [a, b, c],  # font "f": 3 pictures
        [a.copy(), d, None],  # font "g": its first kanji is f's picture; its last is blank
        [
            _picture([(0, 1)]),
            _picture([(0, 1)]),
            _picture([(1, 0)]),
        ],  # font "h": its first two are one picture
    ]
    selection = select_kanji_classes([10, 11, 12], ["f", "g", "h"], references)
    assert [(kanji.codepoint, kanji.pictures) for kanji in selection.classes] == [
        (11, (("f",), ("g",))),
        (12, (("f",), ("h",))),
    ]
    assert selection.too_few_images == [10]  # f = g, and h's picture is ambiguous: one distinct picture left
    assert selection.blank == {"f": [], "g": [12], "h": []}
    assert selection.ambiguous == {"f": [], "g": [], "h": [[10, 11]]}


# ---------------------------------------------------------------------------------------------------
# Building from the synthetic fonts
# ---------------------------------------------------------------------------------------------------


def test_build_keeps_distinct_pictures_of_the_shared_kanji(built: tuple[Path, object]) -> None:
    _, dataset = built
    assert dataset.column_names == ["image", "label", "font", "fonts", "kanji", "codepoint"]
    assert dataset.features["label"].names == [chr(point) for point in KEPT]
    labels = np.asarray(dataset["label"])
    assert np.bincount(labels).tolist() == list(KEPT.values())
    assert labels.tolist() == sorted(labels.tolist())  # rows ordered by label, then font
    rows = list(zip(dataset["kanji"], dataset["font"], dataset["fonts"], dataset["codepoint"], strict=True))
    assert [row[2] for row in rows if row[0] == "丁"] == ["alpha,beta", "gamma", "delta", "epsilon"]
    assert [row[1] for row in rows if row[0] == "万"] == ["alpha", "beta", "delta", "epsilon"]  # gamma blank
    assert [row[1] for row in rows if row[0] == "三"] == ["alpha", "beta", "delta", "epsilon"]  # ambiguous
    assert {row[3] for row in rows if row[0] == "一"} == {"U+4E00"}


def test_images_are_glyphs_scaled_to_their_ink_box_black_on_white(built: tuple[Path, object]) -> None:
    _, dataset = built
    for row in (dataset[0], dataset[7]):
        image = row["image"]
        assert image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 2]).all() and pixels.min() == 0 and pixels.max() == 255
        rows, columns = np.nonzero(pixels[..., 0] < 128)
        # the 4 x 4 pattern's ink box fills the square less a 2 px margin (1/16 of 32) on each side
        assert (rows.min(), rows.max(), columns.min(), columns.max()) == (2, 29, 2, 29)
        assert pixels[0].min() == 255 and pixels[:, -1].min() == 255  # the margin is white


def test_build_info_records_fonts_and_what_was_dropped(built: tuple[Path, object]) -> None:
    cache_dir, dataset = built
    info = read_kanji_build_info(cache_dir, image_size=32)
    assert (info["num_classes"], info["num_images"]) == (5, dataset.num_rows) == (5, 21)
    assert info["kanji_in_every_font"] == info["candidate_classes"] == 6  # all but 上
    assert info["candidate_images"] == 30
    assert info["blank_glyphs"] == {"gamma": "万"}
    assert info["ambiguous_pictures_dropped"] == {"gamma": ["七三"]}
    assert info["same_as_an_earlier_font_dropped"] == {
        "alpha": 0,
        "beta": 1,
        "gamma": 0,
        "delta": 0,
        "epsilon": 0,
    }
    assert info["classes_dropped_too_few_distinct_images"] == "下"
    assert info["images_per_class"] == {"min": 4, "median": 4.0, "max": 5, "counts": {"4": 4, "5": 1}}
    assert info["images_per_font"] == {"alpha": 5, "beta": 4, "gamma": 2, "delta": 5, "epsilon": 5}
    assert info["min_images_per_class"] == MIN_IMAGES and info["image_size"] == 32
    alpha = info["fonts"][0]
    assert alpha["package"] == "@test-fonts/alpha@1.0.0" and alpha["file"] == _member("alpha")
    assert alpha["family"] == "Alpha" and alpha["license_url"] == "https://openfontlicense.org"
    assert alpha["kanji_in_font"] == 7 and alpha["tarball_bytes"] > 0
    assert info["download_bytes"] == sum(font["tarball_bytes"] for font in info["fonts"])


def test_cached_build_is_reused_without_fetching(
    built: tuple[Path, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, dataset = built

    def no_fetch(cache_dir: Path, font: KanjiFont) -> Path:
        raise AssertionError("a cached build must not fetch the fonts")

    monkeypatch.setattr(kanji, "fetch_font_package", no_fetch)
    again = ensure_kanji_dataset(cache_dir, image_size=32, show_progress=False)
    assert again.num_rows == dataset.num_rows and again["fonts"] == dataset["fonts"]
    assert kanji_dataset_dir(cache_dir, 32).name == "kanji-v1-32px"


def test_other_sizes_are_separate_builds_with_the_same_classes(
    built: tuple[Path, object], synthetic_packages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, dataset = built
    fetched = _use_packages(monkeypatch, synthetic_packages)
    larger = ensure_kanji_dataset(cache_dir, image_size=80, show_progress=False)
    assert fetched == list(SYNTHETIC_FONTS) and larger[0]["image"].size == (80, 80)
    assert larger.features["label"].names == dataset.features["label"].names
    assert larger["fonts"] == dataset["fonts"]  # pictures are compared at one size, whatever is stored
    rebuilt = ensure_kanji_dataset(cache_dir, image_size=80, force=True, show_progress=False)
    assert len(fetched) == 2 * len(SYNTHETIC_FONTS) and rebuilt.num_rows == larger.num_rows


def test_the_class_cap_takes_a_seeded_subset(
    synthetic_packages: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_packages(monkeypatch, synthetic_packages)
    monkeypatch.setattr(kanji, "MAX_CLASSES", 3)
    dataset = ensure_kanji_dataset(tmp_path, image_size=32, show_progress=False)
    info = read_kanji_build_info(tmp_path, image_size=32)
    assert info["candidate_classes"] == 3 and info["kanji_in_every_font"] == 6 and info["max_classes"] == 3
    expected = candidate_kanji([frozenset((YI, DING, QI, WAN, SAN, XIA))], 3, kanji.CLASS_SUBSET_SEED)
    kept = [chr(point) for point in expected if point in KEPT]
    assert dataset.features["label"].names == kept


# ---------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------


def _toy_dataset(num_classes: int, per_class: int = 20):
    import datasets
    from PIL import Image

    names = [chr(0x4E00 + index) for index in range(num_classes)]
    image = Image.new("RGB", (4, 4), "white")
    rows = [(label, f"font{index}") for label in range(num_classes) for index in range(per_class)]
    records = {
        "image": [image] * len(rows),
        "label": [label for label, _ in rows],
        "font": [font for _, font in rows],
        "fonts": [font for _, font in rows],
        "kanji": [names[label] for label, _ in rows],
        "codepoint": [f"U+{0x4E00 + label:04X}" for label, _ in rows],
    }
    return datasets.Dataset.from_dict(records, features=kanji._features(names))


def test_kanji_splits_are_class_disjoint_and_deterministic() -> None:
    dataset = _toy_dataset(40)
    splits = kanji_splits(seed=1, num_test_classes=15, validation_classes=4, dataset=dataset)
    assert splits.name == "kanji"
    original = {
        name: set(split["original_label"])
        for name, split in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
    }
    assert [len(original[name]) for name in ("train", "validation", "test")] == [16, 4, 15]
    assert not (original["train"] & original["test"])
    assert not (original["validation"] & (original["train"] | original["test"]))
    assert splits.train.num_rows == 16 * 20 and sorted(set(splits.train["label"])) == list(range(16))
    same = kanji_splits(seed=1, num_test_classes=15, validation_classes=4, dataset=dataset)
    assert set(same.test["original_label"]) == original["test"]
    other = kanji_splits(seed=2, num_test_classes=15, validation_classes=4, dataset=dataset)
    assert set(other.test["original_label"]) != original["test"]
    assert kanji_splits(seed=1, dataset=dataset).validation is None


def test_kanji_splits_of_the_synthetic_build(built: tuple[Path, object]) -> None:
    _, dataset = built
    splits = kanji_splits(seed=0, dataset=dataset)
    assert len(set(splits.train["label"])) == 2 and len(set(splits.test["label"])) == 3
    assert splits.train.num_rows + splits.test.num_rows == dataset.num_rows
    with pytest.raises(ValueError, match="train classes"):
        kanji_splits(seed=0, num_train_classes=3, dataset=dataset)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_bad_image_size_is_refused(tmp_path: Path) -> None:
    for bad in (8, 2048, 64.0, True):
        with pytest.raises(ValueError, match="image_size"):
            ensure_kanji_dataset(tmp_path, image_size=bad)  # type: ignore[arg-type]


def test_corrupt_tarball_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "broken.tgz"
    garbage.write_bytes(b"\x1f\x8b this is not gzip data")
    _use_packages(monkeypatch, {"alpha": garbage})
    with pytest.raises(KanjiDatasetError, match=r"not a readable \.tgz.*delete it"):
        ensure_kanji_dataset(tmp_path / "cache", show_progress=False)
    assert not kanji_dataset_dir(tmp_path / "cache").exists()


def test_package_without_the_pinned_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved = _write_package(
        tmp_path / "alpha.tgz", {"package/fonts/Alpha.ttf": _font_bytes("Alpha", {YI: _pattern(1)})}
    )
    _use_packages(monkeypatch, {"alpha": moved})
    with pytest.raises(KanjiDatasetError, match=rf"has no {_member('alpha')}: the package layout changed"):
        ensure_kanji_dataset(tmp_path / "cache", show_progress=False)


def test_unreadable_font_names_the_font(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _write_package(tmp_path / "alpha.tgz", {_member("alpha"): b"this is not a font"})
    _use_packages(monkeypatch, {"alpha": broken})
    with pytest.raises(KanjiDatasetError, match="The alpha font file is not a readable TrueType"):
        ensure_kanji_dataset(tmp_path / "cache", show_progress=False)


def test_fonts_without_common_kanji_give_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarballs = {
        key: _write_package(tmp_path / f"{key}.tgz", {_member(key): _font_bytes(key, {point: _pattern(1)})})
        for key, point in (("alpha", YI), ("beta", DING))
    }
    _use_packages(monkeypatch, tarballs)
    with pytest.raises(KanjiDatasetError, match=r"no kanji .* in common; coverage per font: alpha 1, beta 1"):
        ensure_kanji_dataset(tmp_path / "cache", show_progress=False)


def test_glyph_reaching_far_outside_its_em_box_is_drawn_whole() -> None:
    font = kanji.load_font(_font_bytes("Wide", {YI: [(0, 0), (3, 3)]}, scale=3), kanji.REFERENCE_EM, "wide")
    ink = kanji.glyph_ink(
        font, YI
    )  # two squares 2.4 em apart, the second one far below and right of the em box
    assert ink is not None
    pixels = np.asarray(kanji.fit_on_square(ink, 64))
    assert (
        pixels[4:12, 4:12].max() < 128 and pixels[52:60, 52:60].max() < 128
    )  # both squares, in opposite corners
    assert pixels[20:44, 20:44].min() == 255
    blank = kanji.load_font(_font_bytes("Blank", {YI: None}), kanji.REFERENCE_EM, "blank")
    assert kanji.glyph_ink(blank, YI) is None


def _fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_npm = fake_bin / "npm"
    fake_npm.write_text(f"#!/bin/sh\n{script}\n")
    fake_npm.chmod(fake_npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")


def test_wrong_checksum_from_npm_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    font = KANJI_FONTS[0]
    _fake_npm(tmp_path, monkeypatch, f"printf 'not the pinned tarball' > {font.package.tarball_name}")
    with pytest.raises(
        KanjiDatasetError,
        match=rf"the {font.key} font: {font.package.spec} from npm has sha256 .*expected {font.package.sha256}",
    ):
        fetch_font_package(tmp_path / "cache", font)
    assert not (tmp_path / "cache" / "npm" / font.package.tarball_name).exists()


def test_missing_npm_gives_a_clear_error_unless_the_tarball_is_cached(
    tmp_path: Path, synthetic_packages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KanjiDatasetError, match=r"npm is not on PATH.*copy the tarball to"):
        fetch_font_package(tmp_path, KANJI_FONTS[0])
    pinned = _pinned("alpha", synthetic_packages["alpha"])
    cached = tmp_path / "npm" / pinned.package.tarball_name
    cached.parent.mkdir()
    shutil.copy(synthetic_packages["alpha"], cached)
    assert cached.name == "test-fonts-alpha-1.0.0.tgz"
    assert fetch_font_package(tmp_path, pinned) == cached


# ---------------------------------------------------------------------------------------------------
# The real dataset (only when its build is cached)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_kanji() -> object:
    if not (kanji_dataset_dir() / kanji.BUILD_INFO_FILE).is_file():
        pytest.skip(
            "the kanji dataset is not cached (building it downloads 178 MB of fonts): "
            "python -c 'from vpdml.offline import ensure_kanji_dataset; ensure_kanji_dataset()'"
        )
    return ensure_kanji_dataset(show_progress=False)


@pytest.mark.slow
def test_real_dataset_has_2000_classes_of_about_28_fonts(real_kanji) -> None:
    names = real_kanji.features["label"].names
    assert len(names) == 2000 and [ord(name) for name in names] == sorted(ord(name) for name in names)
    per_class = np.bincount(np.asarray(real_kanji["label"]), minlength=len(names))
    assert per_class.min() >= kanji.MIN_IMAGES_PER_CLASS and per_class.max() == len(KANJI_FONTS)
    assert np.median(per_class) == len(KANJI_FONTS)
    assert set(real_kanji["font"]) == {font.key for font in KANJI_FONTS}
    assert real_kanji[0]["image"].mode == "RGB" and real_kanji[0]["image"].size == (64, 64)
    info = read_kanji_build_info()
    assert [font["sha256"] for font in info["fonts"]] == [font.package.sha256 for font in KANJI_FONTS]
    assert info["kanji_in_every_font"] == 2950
    assert info["ambiguous_pictures_dropped"] == {"hina-mincho": ["樋通"]}  # Hina Mincho draws 樋 as 通


@pytest.mark.slow
def test_real_kanji_splits_halve_the_classes(real_kanji) -> None:
    splits = kanji_splits(seed=0, num_train_classes=200, num_test_classes=250, dataset=real_kanji)
    train, test = set(splits.train["original_label"]), set(splits.test["original_label"])
    assert (len(train), len(test)) == (200, 250) and not train & test
    assert splits.test.num_rows >= 250 * kanji.MIN_IMAGES_PER_CLASS


def test_module_reexports() -> None:
    from vpdml import offline

    assert offline.ensure_kanji_dataset is ensure_kanji_dataset and offline.kanji_splits is kanji_splits
    assert offline.KanjiDatasetError is KanjiDatasetError is kanji_fonts.KanjiDatasetError
