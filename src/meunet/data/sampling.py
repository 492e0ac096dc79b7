"""The patch grid, the per-patch class counts (read slab by slab from the labels) and background rejection.

A volume of shape (Z, Y, X) is covered by a grid of patches of side ``patch`` whose starts are ``0, step,
2 step, ...`` along each axis, as many as needed to cover the volume; the last patches may reach past the
volume's end, where the labels count as background (the volume is zero-padded). ``step`` must divide
``patch``, so every patch is a union of ``patch / step`` grid cells per axis and its class counts are sums of
cell counts: the labels are read once, in slabs of whole cells along z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from meunet.errors import InputError
from meunet.io import iter_slabs

Shape3 = tuple[int, int, int]

SLAB_BYTES = 64 * 2**20


def grid_counts(shape: Shape3, patch: Shape3, step: Shape3) -> Shape3:
    """Number of grid patches per axis that cover ``shape`` (at least one per axis)."""
    return tuple(max(math.ceil((d - p) / s), 0) + 1 for d, p, s in zip(shape, patch, step, strict=True))  # type: ignore


def check_labels(slab: np.ndarray, n_classes: int, path: str | PathLike[str]) -> np.ndarray:
    """Return a label slab as uint8 after checking its values are integers in [0, n_classes).

    Raises:
        InputError: a value is not an integer class index below ``n_classes``.
    """
    if slab.size == 0:
        return slab.astype(np.uint8)
    low, high = slab.min(), slab.max()
    if not np.issubdtype(slab.dtype, np.integer) and not np.array_equal(slab, np.floor(slab)):
        raise InputError(path, "label values must be integers")
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise InputError(path, f"label value {bad:g} outside the {n_classes} classes (0..{n_classes - 1})")
    return slab.astype(np.uint8, copy=False)


def cell_class_counts(
    labels, n_classes: int, cells: Shape3, cell: Shape3, path: str | PathLike[str]
) -> np.ndarray:
    """Voxels per class in each grid cell, reading ``labels`` in z slabs of whole cells.

    Args:
        labels: (Z, Y, X) array or lazy array supporting ``labels[z0:z1]``, integer values in [0, C).
        n_classes: number of classes C.
        cells: number of cells per axis; cells past the volume's end count as background.
        cell: cell side per axis, in voxels.
        path: named in errors.

    Returns:
        int64 array (C, cz, cy, cx).
    """
    height, width = labels.shape[1:]
    counts = np.zeros((n_classes, *cells), dtype=np.int64)
    counts[0] = math.prod(cell)  # cells past the volume's end hold background only
    padded_yx = (cells[1] * cell[1], cells[2] * cell[2])
    depth = cell[0] * max(1, SLAB_BYTES // (cell[0] * padded_yx[0] * padded_yx[1]))
    for z0, data in iter_slabs(labels, depth):
        cz0, ncz = z0 // cell[0], -(-len(data) // cell[0])
        slab = np.zeros((ncz * cell[0], *padded_yx), dtype=np.uint8)
        slab[: len(data), :height, :width] = check_labels(data, n_classes, path)
        blocks = slab.reshape(ncz, cell[0], cells[1], cell[1], cells[2], cell[2])
        for c in range(n_classes):
            counts[c, cz0 : cz0 + ncz] = (blocks == c).sum(axis=(1, 3, 5))
    return counts


def patch_class_counts(labels, n_classes: int, patch: Shape3, step: Shape3, path: str | PathLike[str]):
    """Class counts of every grid patch of one volume.

    Args:
        labels: (Z, Y, X) label array (lazy allowed), read once in slabs.
        n_classes: number of classes C.
        patch: patch side per axis; ``step`` must divide it.
        step: grid step per axis.
        path: named in errors.

    Returns:
        ``(starts, counts)``: int64 (K, 3) patch starts (z, y, x) in grid order and int64 (K, C) voxel counts.
    """
    n = grid_counts(labels.shape, patch, step)
    span = tuple(p // s for p, s in zip(patch, step, strict=True))
    cells = tuple(k + w - 1 for k, w in zip(n, span, strict=True))
    counts = cell_class_counts(labels, n_classes, cells, step, path)
    windows = sliding_window_view(counts, span, axis=(1, 2, 3)).sum(axis=(-3, -2, -1))
    grid = np.stack(np.meshgrid(*(np.arange(k) * s for k, s in zip(n, step, strict=True)), indexing="ij"), -1)
    return grid.reshape(-1, 3).astype(np.int64), windows.reshape(n_classes, -1).T.copy()


def keep_mask(counts: np.ndarray, threshold: float, keep_probability: float, rng: np.random.Generator):
    """Background rejection: a patch whose voxels are at least ``threshold`` background (class 0) is kept with
    probability ``keep_probability``; all others are kept.

    Args:
        counts: int64 (K, C) voxel counts per patch.
        threshold: background fraction from which a patch is a rejection candidate (0.98 in the paper).
        keep_probability: chance a candidate is kept anyway (0.05 in the paper).
        rng: one uniform number is drawn per patch, whatever the outcome.

    Returns:
        bool (K,) mask of kept patches.
    """
    draws = rng.random(len(counts))
    background = counts[:, 0] / counts.sum(axis=1)
    return (background < threshold) | (draws < keep_probability)


@dataclass(frozen=True)
class PatchIndex:
    """The kept training patches of all volumes.

    Attributes:
        volume: int64 (K,) volume number of each patch.
        start: int64 (K, 3) start (z, y, x) of each local patch; may reach past the volume's end.
        counts: int64 (K, C) voxels per class in each patch.
    """

    volume: np.ndarray
    start: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.volume)

    @property
    def class_counts(self) -> np.ndarray:
        """int64 (C,) voxels per class summed over the kept patches (for the loss weights)."""
        return self.counts.sum(axis=0)


def build_index(
    labels: list,
    paths: list[str | PathLike[str]],
    n_classes: int,
    patch: Shape3,
    step: Shape3,
    threshold: float,
    keep_probability: float,
    seed: int,
) -> PatchIndex:
    """Sampling index over several label volumes, each read once slab by slab.

    Args:
        labels: (Z, Y, X) label arrays (lazy allowed), one per training volume.
        paths: the label files, named in errors.
        n_classes, patch, step: as in :func:`patch_class_counts`.
        threshold, keep_probability: as in :func:`keep_mask`.
        seed: rejection of volume ``i`` draws from ``numpy.random.default_rng([seed, i])``.

    Raises:
        InputError: a label value outside the classes, or no patch kept at all.
    """
    volumes, starts, counts = [], [], []
    for i, (array, path) in enumerate(zip(labels, paths, strict=True)):
        grid, patch_counts = patch_class_counts(array, n_classes, patch, step, path)
        kept = keep_mask(patch_counts, threshold, keep_probability, np.random.default_rng([seed, i]))
        volumes.append(np.full(kept.sum(), i, dtype=np.int64))
        starts.append(grid[kept])
        counts.append(patch_counts[kept])
    index = PatchIndex(*(np.concatenate(parts) for parts in (volumes, starts, counts)))
    if len(index) == 0:
        side = "x".join(map(str, patch))
        raise InputError(
            paths[0],
            f"every training patch ({side}) is at least {threshold:.0%} background"
            " (patch.background_threshold) and none was kept: nothing to train on",
        )
    return index


Region = tuple[int, int, int, int]  # (volume, axis, lo, hi): lo <= index < hi along one axis of a volume


def fold_regions(shapes: list[Shape3], folds: int) -> list[list[Region]]:
    """The regions each of ``folds`` folds holds out, for out-of-fold stage-1 output.

    With at least as many volumes as folds, fold ``f`` holds out the whole volumes ``i`` with
    ``i % folds == f``; with fewer, every volume is cut into ``folds`` contiguous blocks along its longest
    axis (z unless another is longer) and fold ``f`` holds out block ``f`` of each (so a single labelled scan
    works). Every voxel of every volume is held out by exactly one fold.

    >>> fold_regions([(10, 4, 4), (10, 4, 4), (10, 4, 4)], 2)
    [[(0, 0, 0, 10), (2, 0, 0, 10)], [(1, 0, 0, 10)]]
    >>> fold_regions([(10, 4, 4)], 3)
    [[(0, 0, 0, 3)], [(0, 0, 3, 6)], [(0, 0, 6, 10)]]
    >>> fold_regions([(4, 12, 6)], 2)
    [[(0, 1, 0, 6)], [(0, 1, 6, 12)]]
    """
    if len(shapes) >= folds:
        return [[(i, 0, 0, s[0]) for i, s in enumerate(shapes) if i % folds == f] for f in range(folds)]
    axes = [int(np.argmax(s)) for s in shapes]
    return [
        [
            (i, a, s[a] * f // folds, s[a] * (f + 1) // folds)
            for i, (s, a) in enumerate(zip(shapes, axes, strict=True))
        ]
        for f in range(folds)
    ]


def without_regions(index: PatchIndex, regions: list[Region], patch: Shape3, margin: Shape3) -> PatchIndex:
    """The patches of ``index`` that read nothing of ``regions``.

    Args:
        index: kept patches; ``index.start`` are local patch starts.
        regions: held-out (volume, axis, lo, hi) regions.
        patch: local patch side (z, y, x).
        margin: what a sample reads beyond the local patch on each side (the context margin of a meU-net,
            else 0).

    >>> index = PatchIndex(np.zeros(4, np.int64), np.array([[0, 0, 0], [8, 0, 0], [16, 0, 0], [24, 0, 0]]),
    ...                    np.ones((4, 2), np.int64))
    >>> without_regions(index, [(0, 0, 0, 16)], (8, 8, 8), (0, 0, 0)).start[:, 0].tolist()
    [16, 24]
    >>> without_regions(index, [(0, 0, 0, 16)], (8, 8, 8), (4, 4, 4)).start[:, 0].tolist()
    [24]
    """
    keep = np.ones(len(index), dtype=bool)
    for volume, axis, lo, hi in regions:
        first = index.start[:, axis] - margin[axis]
        last = index.start[:, axis] + patch[axis] + margin[axis]
        keep &= ~((index.volume == volume) & (first < hi) & (last > lo))
    return PatchIndex(index.volume[keep], index.start[keep], index.counts[keep])
