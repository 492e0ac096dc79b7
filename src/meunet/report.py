"""Pictures for people: label overlays (and, from other modules' authors, curves and reports).

Figures are drawn with matplotlib's object API (no pyplot state, no display needed) and written to a
temporary name, then renamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

PLANES = ("axial (z)", "coronal (y)", "sagittal (x)")


def foreground_centre(labels, slab: int = 64) -> tuple[int, int, int]:
    """Per axis, the plane holding the most foreground (label > 0) voxels (the middle one of ties).

    Args:
        labels: (Z, Y, X) integer array or lazy array sliced along z.
        slab: slices per read.

    Returns:
        (z, y, x); the volume's centre on an axis where there is no foreground.
    """
    depth, height, width = labels.shape
    per_z = np.zeros(depth, np.int64)
    per_y = np.zeros(height, np.int64)
    per_x = np.zeros(width, np.int64)
    for z0 in range(0, depth, slab):
        mask = np.asarray(labels[z0 : z0 + slab]) > 0
        per_z[z0 : z0 + len(mask)] = mask.sum(axis=(1, 2))
        per_y += mask.sum(axis=(0, 2))
        per_x += mask.sum(axis=(0, 1))
    return tuple(_middle_of_max(c) for c in (per_z, per_y, per_x))  # type: ignore[return-value]


def _middle_of_max(counts: np.ndarray) -> int:
    """The middle index among those holding the largest count (the centre when all are zero)."""
    ties = np.flatnonzero(counts == counts.max())
    return int(ties[len(ties) // 2])


def orthogonal_slices(volume, centre: Sequence[int], slab: int = 64) -> list[np.ndarray]:
    """The three planes through ``centre`` = (z, y, x): (Y, X) at z, (Z, X) at y, (Z, Y) at x.

    ``volume`` is a (Z, Y, X) array or lazy array; it is read slab by slab along z.
    """
    z, y, x = centre
    depth = volume.shape[0]
    coronal = np.empty((depth, volume.shape[2]), volume.dtype)
    sagittal = np.empty((depth, volume.shape[1]), volume.dtype)
    for z0 in range(0, depth, slab):
        part = np.asarray(volume[z0 : z0 + slab])
        coronal[z0 : z0 + len(part)] = part[:, y, :]
        sagittal[z0 : z0 + len(part)] = part[:, :, x]
    return [np.asarray(volume[z : z + 1])[0], coronal, sagittal]


def label_colormap(n_classes: int) -> ListedColormap:
    """Black for background (label 0), then matplotlib's ``tab10`` colours."""
    tab10 = colormaps["tab10"].colors
    return ListedColormap([(0.0, 0.0, 0.0), *(tab10[(c - 1) % 10] for c in range(1, n_classes))])


def save_overlay(
    pred,
    truth,
    path: str | os.PathLike[str],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    class_names: Sequence[str] | None = None,
) -> Path:
    """PNG of three orthogonal slices through the truth's foreground: prediction (left) beside truth (right).

    Args:
        pred, truth: (Z, Y, X) label volumes (arrays or lazy arrays), same shape.
        path: the PNG to write (temporary name, then renamed).
        spacing_mm: voxel size (z, y, x), for the aspect ratio of each plane.
        class_names: legend names by label value (default ``label 0``, ``label 1``, ...).

    Returns:
        ``path``.
    """
    path = Path(path)
    centre = foreground_centre(truth)
    planes = [orthogonal_slices(v, centre) for v in (pred, truth)]
    names = list(class_names or [])
    n_classes = max(len(names), *(int(s.max()) + 1 for slices in planes for s in slices))
    names += [f"label {c}" for c in range(len(names), n_classes)]
    cmap = label_colormap(n_classes)
    sz, sy, sx = spacing_mm
    aspects = (sy / sx, sz / sx, sz / sy)
    fig = Figure(figsize=(8, 11), layout="constrained")
    axes = fig.subplots(3, 2)
    for row, (plane, aspect, index) in enumerate(zip(PLANES, aspects, centre, strict=True)):
        for col, (title, slices) in enumerate(zip(("prediction", "truth"), planes, strict=True)):
            ax = axes[row, col]
            ax.imshow(
                slices[row], cmap=cmap, vmin=0, vmax=n_classes - 1, interpolation="nearest", aspect=aspect
            )
            ax.set_title(f"{title}, {plane} = {index}")
            ax.set_axis_off()
    handles = [Patch(color=cmap(c), label=names[c]) for c in range(n_classes)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(n_classes, 5))
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=80)
    os.replace(tmp, path)
    return path
