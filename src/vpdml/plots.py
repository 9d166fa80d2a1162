"""PNG plots for training runs and model cards: learning curves and retrieval examples.

Figures are built on matplotlib's object API with the Agg canvas, never through ``pyplot``: no display
is needed, no global backend is switched, and figures are freed as soon as they are saved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

ImageSource: TypeAlias = Sequence[Image.Image] | Callable[[int], Image.Image]
"""Images as a sequence, or a function index -> image so a large dataset is read only where shown."""

CORRECT_COLOUR = "#1a9850"
WRONG_COLOUR = "#d73027"

TRAIN_KEYS = ("loss", "lr")
"""Keys of a training-log row; any other numeric key (besides step/epoch) is an evaluation metric."""

_NON_METRIC_KEYS = {"step", "epoch", *TRAIN_KEYS}
_THUMBNAIL_PIXELS = 160  # longest side of a grid cell: enough to recognise the object, small PNGs
_CELL_INCHES = 1.7
_FRAME_WIDTH = 5.0


# --------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, *, dpi: int = 100) -> Path:
    """Plot loss (with the learning rate on a twin axis) and evaluation metrics against the step.

    Args:
        history: Log rows, each with a ``step``; training rows carry ``loss`` and/or ``lr`` (and
            ``epoch``), evaluation rows any other numeric keys (``recall@1``, ``map@r``, ...).
            A row may hold both kinds.
        path: Where the PNG is written (parent folders are created).

    Raises:
        ValueError: if the history is empty or a row has no ``step``.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    for row in history:
        if "step" not in row:
            raise ValueError(f"every history row needs a 'step'; got {dict(row)}")

    metric_names = _metric_names(history)
    has_training = any(key in row for row in history for key in TRAIN_KEYS)
    panels = int(has_training) + int(bool(metric_names))

    fig = _new_figure(width=7.0, height=3.2 * panels)
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    if has_training:
        _draw_loss_and_lr(axes[0], history)
    if metric_names:
        _draw_metrics(axes[-1], history, metric_names)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, path, dpi)


def _metric_names(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Evaluation metric keys in first-seen order."""
    names = (
        key
        for row in history
        for key, value in row.items()
        if key not in _NON_METRIC_KEYS and _is_number(value)
    )
    return list(dict.fromkeys(names))


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have ``key``, in step order."""
    points = sorted((row["step"], row[key]) for row in history if _is_number(row.get(key)))
    return [step for step, _ in points], [value for _, value in points]


def _draw_loss_and_lr(ax: Axes, history: Sequence[Mapping[str, Any]]) -> None:
    steps, losses = _series(history, "loss")
    ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_steps, lrs = _series(history, "lr")
    if lrs:
        # Twin axis: the lr lives on a scale orders of magnitude below the loss.
        lr_ax = ax.twinx()
        lr_ax.plot(lr_steps, lrs, color="tab:orange", linestyle="--", label="lr")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set_title("training")


def _draw_metrics(ax: Axes, history: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> None:
    for name in metric_names:
        steps, values = _series(history, name)
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("evaluation")


# --------------------------------------------------------------------------------------------------
# Retrieval grid
# --------------------------------------------------------------------------------------------------


def neighbor_correctness(
    query_labels: Any, gallery_labels: Any, neighbor_indices: Any, *, max_queries: int | None = None
) -> np.ndarray:
    """Boolean (queries x k) array: whether each retrieved gallery item shares its query's label.

    Labels and indices may be lists, numpy arrays or detached CPU tensors.
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    indices = _as_2d_indices(neighbor_indices)[:max_queries]
    return gallery_labels[indices] == query_labels[: len(indices), None]


def frame_colours(
    query_labels: Any, gallery_labels: Any, neighbor_indices: Any, *, max_queries: int | None = None
) -> list[list[str]]:
    """Frame colour of every neighbour cell in :func:`plot_retrieval_grid` (green correct, red wrong)."""
    correct = neighbor_correctness(query_labels, gallery_labels, neighbor_indices, max_queries=max_queries)
    return [[CORRECT_COLOUR if hit else WRONG_COLOUR for hit in row] for row in correct]


def plot_retrieval_grid(
    query_images: ImageSource,
    query_labels: Any,
    gallery_images: ImageSource,
    gallery_labels: Any,
    neighbor_indices: Any,
    neighbor_scores: Any,
    path: str | Path,
    *,
    max_queries: int = 8,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    dpi: int = 100,
) -> Path:
    """Draw queries and their nearest gallery images, framed green when the label matches, red when not.

    One row per query (the first ``max_queries``): the query, then its neighbours in rank order, each
    titled with its cosine score. For single-set retrieval (gallery = queries) the caller passes
    ``neighbor_indices`` with each query's own index already removed.

    Args:
        query_images, gallery_images: PIL images, or callables index -> PIL image.
        query_labels, gallery_labels: Integer class labels (list, numpy array or CPU tensor).
        neighbor_indices: (queries x k) gallery indices, best first.
        neighbor_scores: (queries x k) cosine similarities matching ``neighbor_indices``.
        path: Where the PNG is written (parent folders are created).
        class_names: Label -> readable name, shown under the query and wrong neighbours.

    Raises:
        ValueError: if indices and scores disagree in shape or there is no query to show.
    """
    indices = _as_2d_indices(neighbor_indices)[:max_queries]
    scores = _as_2d(neighbor_scores, "neighbor_scores").astype(float)[:max_queries]
    if scores.shape != indices.shape:
        raise ValueError(f"neighbor_scores {scores.shape} does not match neighbor_indices {indices.shape}")
    if indices.shape[0] == 0:
        raise ValueError("no queries to plot")
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    colours = frame_colours(query_labels, gallery_labels, indices)

    n_rows, n_cols = indices.shape[0], indices.shape[1] + 1
    fig = _new_figure(width=_CELL_INCHES * n_cols, height=(_CELL_INCHES + 0.35) * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row in range(n_rows):
        query_label = int(query_labels[row])
        _draw_cell(
            axes[row, 0],
            _get_image(query_images, row),
            title=f"query\n{_class_name(query_label, class_names)}",
            frame_colour="black",
        )
        for col, (gallery_index, score) in enumerate(zip(indices[row], scores[row], strict=True), start=1):
            gallery_label = int(gallery_labels[gallery_index])
            subtitle = "" if gallery_label == query_label else f"\n{_class_name(gallery_label, class_names)}"
            _draw_cell(
                axes[row, col],
                _get_image(gallery_images, int(gallery_index)),
                title=f"{score:.3f}{subtitle}",
                frame_colour=colours[row][col - 1],
            )
    fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.02, wspace=0.12, hspace=0.45)
    return _save(fig, path, dpi)


def _as_2d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[None, :]  # a single query's neighbours
    if array.ndim != 2:
        raise ValueError(f"{name} must be (queries x k), got shape {array.shape}")
    return array


def _as_2d_indices(neighbor_indices: Any) -> np.ndarray:
    return _as_2d(neighbor_indices, "neighbor_indices").astype(np.int64)


def _get_image(images: ImageSource, index: int) -> Image.Image:
    image = images(index) if callable(images) else images[index]
    thumbnail = image.convert("RGB")  # also copies, so the caller's image is never resized in place
    thumbnail.thumbnail((_THUMBNAIL_PIXELS, _THUMBNAIL_PIXELS))
    return thumbnail


def _class_name(label: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if class_names is None:
        return f"class {label}"
    try:
        return str(class_names[label])
    except (IndexError, KeyError):
        return f"class {label}"


def _draw_cell(ax: Axes, image: Image.Image, *, title: str, frame_colour: str) -> None:
    ax.imshow(np.asarray(image))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(frame_colour)
        spine.set_linewidth(_FRAME_WIDTH)
    ax.set_title(title, fontsize=8)


# --------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------


def _new_figure(*, width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: rendering needs no display or pyplot state
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", facecolor="white")
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
