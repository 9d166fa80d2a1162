"""Tests for vpdml.plots: PNGs are written and the retrieval grid marks hits and misses correctly."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpdml import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_bytes: int = 5_000) -> Image.Image:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > min_bytes  # something was drawn, not an empty canvas
    image = Image.open(path)
    image.load()
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------


def _history() -> list[dict[str, float]]:
    train = [
        {"step": step, "epoch": step / 50, "loss": 3.0 / (1 + step / 20), "lr": 1e-3 * (1 - step / 200)}
        for step in range(0, 200, 10)
    ]
    evaluation = [
        {"step": step, "recall@1": 0.2 + step / 1000, "map@r": 0.1 + step / 2000} for step in (50, 100, 150)
    ]
    return train + evaluation


def test_training_curves_png_has_a_loss_and_an_eval_panel(tmp_path: Path) -> None:
    path = plots.plot_training_curves(_history(), tmp_path / "sub" / "curves.png", dpi=100)
    assert path == tmp_path / "sub" / "curves.png"
    image = _assert_png(path)
    assert image.size == (700, 640)  # 7 in wide, 2 panels x 3.2 in, at 100 dpi


def test_training_curves_with_one_kind_of_row_draw_one_panel(tmp_path: Path) -> None:
    train_only = [row for row in _history() if "loss" in row]
    eval_only = [row for row in _history() if "loss" not in row]
    for name, history in (("train", train_only), ("eval", eval_only)):
        image = _assert_png(plots.plot_training_curves(history, tmp_path / f"{name}.png"))
        assert image.size == (700, 320)


def test_training_curves_accept_rows_with_both_kinds_of_keys(tmp_path: Path) -> None:
    history = [
        {"step": 1, "loss": 2.0, "lr": 0.1, "recall@1": 0.3},
        {"step": 2, "loss": 1.5, "recall@1": 0.4},
    ]
    image = _assert_png(plots.plot_training_curves(history, tmp_path / "both.png"))
    assert image.size == (700, 640)


def test_training_curves_reject_bad_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plots.plot_training_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="step"):
        plots.plot_training_curves([{"loss": 1.0}], tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------
# Retrieval grid
# --------------------------------------------------------------------------------------------------


def test_frame_colours_follow_label_agreement() -> None:
    query_labels = [0, 1]
    gallery_labels = np.array([0, 1, 1, 0, 2])
    neighbors = np.array([[0, 1, 3], [2, 4, 1]])
    assert plots.neighbor_correctness(query_labels, gallery_labels, neighbors).tolist() == [
        [True, False, True],
        [True, False, True],
    ]
    green, red = plots.CORRECT_COLOUR, plots.WRONG_COLOUR
    assert plots.frame_colours(query_labels, gallery_labels, neighbors) == [
        [green, red, green],
        [green, red, green],
    ]
    assert plots.frame_colours(query_labels, gallery_labels, neighbors, max_queries=1) == [
        [green, red, green]
    ]


def _grey(size: tuple[int, int] = (96, 128)) -> Image.Image:
    return Image.new("RGB", size, (128, 128, 128))


def _colour_counts(strip: np.ndarray) -> tuple[int, int]:
    """(green, red) pixel counts: only the frames are saturated, the images and text are grey/black."""
    r, g, b = (strip[..., channel].astype(int) for channel in range(3))
    green = int(((g > 120) & (r < 90) & (b < 120)).sum())
    red = int(((r > 180) & (g < 90) & (b < 90)).sum())
    return green, red


def test_retrieval_grid_frames_hits_green_and_misses_red(tmp_path: Path) -> None:
    gallery_labels = [3, 5, 3, 7, 3]
    neighbors = [[2, 1, 4]]  # hit, miss, hit for a query of class 3
    requested: list[int] = []

    def load_gallery_image(index: int) -> Image.Image:
        requested.append(index)
        return _grey((200, 150))

    path = plots.plot_retrieval_grid(
        [_grey()],
        [3],
        load_gallery_image,
        gallery_labels,
        neighbors,
        [[0.9, 0.8, 0.7]],
        tmp_path / "grid.png",
        class_names={3: "cardinal", 5: "sparrow", 7: "wren"},
    )

    pixels = np.asarray(_assert_png(path, min_bytes=2_000))
    assert sorted(requested) == [1, 2, 4]  # only the shown gallery images are loaded
    # Columns sit at equal widths between the 2% side margins.
    width = pixels.shape[1]
    edges = np.linspace(0.02 * width, 0.98 * width, 5).astype(int)
    counts = [_colour_counts(pixels[:, left:right]) for left, right in itertools.pairwise(edges)]
    query, first, second, third = counts
    assert query == (0, 0)  # the query has a neutral frame
    assert first[0] > 100 and first[1] == 0
    assert second[1] > 100 and second[0] == 0
    assert third[0] > 100 and third[1] == 0


def test_retrieval_grid_shows_at_most_max_queries_rows(tmp_path: Path) -> None:
    n_queries, k = 5, 3
    rng = np.random.default_rng(0)
    neighbors = rng.integers(0, 10, size=(n_queries, k))
    scores = np.sort(rng.random((n_queries, k)))[:, ::-1]
    path = plots.plot_retrieval_grid(
        [_grey() for _ in range(n_queries)],
        np.arange(n_queries) % 2,
        [_grey() for _ in range(10)],
        np.arange(10) % 2,
        neighbors,
        scores,
        tmp_path / "grid.png",
        max_queries=2,
        dpi=100,
    )
    image = _assert_png(path, min_bytes=2_000)
    assert image.size == (round(1.7 * (k + 1) * 100), round((1.7 + 0.35) * 2 * 100))


def test_retrieval_grid_rejects_mismatched_scores(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_retrieval_grid(
            [_grey()], [0], [_grey(), _grey()], [0, 1], [[0, 1]], [[0.5]], tmp_path / "grid.png"
        )
