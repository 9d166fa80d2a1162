"""Which rendered pictures are "the same": the duplicate test shared by the icon and kanji benchmarks.

Two renderings of one class that are the same picture (two icon styles drawn alike, two fonts derived from
one design) would put a relevant item at distance zero from its query, so the benchmarks keep one image per
distinct picture. Pictures are compared pixel by pixel with a tolerance that absorbs anti-aliasing only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# Two pictures are the same when no pixel differs by more than this (of 255): the same outline drawn with
# other path data (or hinted differently) differs by anti-aliasing only (up to ~60 levels at 64 px), while
# a real difference fills whole pixels (255).
SAME_PICTURE_TOLERANCE = 64


def same_picture_groups(pictures: np.ndarray, tolerance: int = SAME_PICTURE_TOLERANCE) -> np.ndarray:
    """A group id per picture (``N x H x W [x C]`` uint8): the smallest index of its connected component.

    Two pictures are linked when no pixel (and channel) differs by more than ``tolerance``. Exact copies
    are merged first; the other pairs are screened on 8 x 8 block means (a block mean cannot differ by more
    than the pixels in it, so no pair within tolerance is missed) and then checked pixel by pixel.
    """
    count = len(pictures)
    flat = pictures.reshape(count, -1)
    first_of_digest: dict[bytes, int] = {}
    exact = np.array([first_of_digest.setdefault(row.tobytes(), index) for index, row in enumerate(flat)])
    unique = np.flatnonzero(exact == np.arange(count))
    edges = [(int(exact[index]), index) for index in range(count) if exact[index] != index]
    for left, right in _screened_pairs(_block_means(pictures[unique]), float(tolerance)):
        difference = np.abs(flat[unique[left]].astype(np.int16) - flat[unique[right]].astype(np.int16))
        if int(difference.max()) <= tolerance:
            edges.append((int(unique[left]), int(unique[right])))
    return connected_components(count, edges)


def ordered_groups(order: Sequence[str], groups: Mapping[str, int]) -> tuple[tuple[str, ...], ...]:
    """The keys of ``groups`` gathered by group id, keys and groups both in ``order``'s order.

    ``ordered_groups(("a", "b", "c"), {"c": 1, "a": 1, "b": 2}) == (("a", "c"), ("b",))``: the first key of
    each group is the one a benchmark stores, so the stored source of a picture never depends on dict order.
    """
    by_group: dict[int, list[str]] = {}
    for key in (key for key in order if key in groups):
        by_group.setdefault(groups[key], []).append(key)
    return tuple(tuple(keys) for keys in by_group.values())


def connected_components(count: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """Union-find: for each node, the smallest node of its connected component."""
    parent = list(range(count))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for left, right in edges:
        left_root, right_root = root(left), root(right)
        if left_root != right_root:
            parent[max(left_root, right_root)] = min(left_root, right_root)
    return np.array([root(node) for node in range(count)], dtype=np.int64)


def _block_means(pictures: np.ndarray, grid: int = 8) -> np.ndarray:
    """Channel-mean pixels averaged over ``grid x grid`` blocks (all pixels when the size won't divide)."""
    count, height, width = pictures.shape[:3]
    grey = pictures.reshape(count, height, width, -1).mean(axis=3, dtype=np.float32)
    if height % grid or width % grid:
        return grey.reshape(count, -1)
    return grey.reshape(count, grid, height // grid, grid, width // grid).mean(axis=(2, 4)).reshape(count, -1)


def _screened_pairs(features: np.ndarray, tolerance: float, chunk: int = 512) -> list[tuple[int, int]]:
    """Pairs ``i < j`` whose features differ by at most ``tolerance`` in every coordinate (L-infinity)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(tensor), chunk):
        distances = torch.cdist(tensor[start : start + chunk], tensor, p=float("inf"))
        rows, columns = torch.nonzero(distances <= tolerance + 1e-3, as_tuple=True)
        rows = rows + start
        keep = rows < columns
        pairs.extend(zip(rows[keep].tolist(), columns[keep].tolist(), strict=True))
    return pairs
