"""Segmentation metrics, accumulated slab by slab so paper-size volumes evaluate in bounded memory.

Labels are uint8 arrays (z, y, x) with values in [0, n_classes). Overlap scores come from a confusion matrix
summed over slabs; the surface distance (HD95) from the surface voxels of each class, found slab by slab with
a one-slice halo, so only surfaces (not volumes or bounding boxes) are ever held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Count voxels by (truth, prediction) class pair.

    Args:
        pred: predicted labels, any shape, integer dtype (uint8 expected).
        truth: true labels, same shape as ``pred``.
        n_classes: number of classes C; values must lie in [0, C).

    Returns:
        int64 array (C, C), entry [t, p] = number of voxels with truth t predicted as p. Sum the result of
        several slabs to get the whole volume's counts.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    index = truth.astype(np.int32, copy=False).ravel() * n_classes + pred.astype(np.int32, copy=False).ravel()
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def dice_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Dice per class, float64 (C,), from a (C, C) confusion matrix; NaN where a class is absent from both."""
    tp = np.diag(confusion).astype(np.float64)
    denom = confusion.sum(0) + confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """IoU (Jaccard) per class, float64 (C,), from a (C, C) confusion matrix; NaN where a class is absent."""
    tp = np.diag(confusion).astype(np.float64)
    denom = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def precision_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Precision per class, float64 (C,): TP / predicted voxels; NaN where the class is never predicted."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(predicted > 0, tp / predicted, np.nan)


def recall_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Recall (sensitivity) per class, float64 (C,): TP / true voxels; NaN where the class is absent."""
    tp = np.diag(confusion).astype(np.float64)
    actual = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(actual > 0, tp / actual, np.nan)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface voxels (voxels of the mask with a 6-neighbour outside it) of one slab of a binary mask.

    Args:
        mask: bool (dz + 2, Y, X): the slab with one slice of halo on each side; where the slab touches the
            volume's end, the halo is a False slice (outside the volume counts as background).

    Returns:
        int32 (N, 3) (z, y, x) indices of the surface voxels of the dz slab slices, z counted from the
        slab's first slice.
    """
    interior = ndimage.binary_erosion(mask, border_value=0)
    return np.argwhere(mask[1:-1] & ~interior[1:-1]).astype(np.int32)


def hausdorff95_mm(pred_surface: np.ndarray, truth_surface: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between two surfaces, in millimetres.

    Defined as MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the 95th percentiles of
    the distances from each surface voxel of one mask to the nearest surface voxel of the other.

    Args:
        pred_surface, truth_surface: int (N, 3) (z, y, x) voxel indices (see :func:`surface_voxels`).
        spacing_mm: voxel size (z, y, x) in millimetres.

    Returns:
        the distance; NaN when both surfaces are empty, inf when one is.
    """
    if len(pred_surface) == 0 and len(truth_surface) == 0:
        return float("nan")
    if len(pred_surface) == 0 or len(truth_surface) == 0:
        return float("inf")
    scale = np.asarray(spacing_mm, np.float64)
    a, b = pred_surface * scale, truth_surface * scale
    a_to_b = cKDTree(b).query(a)[0]
    b_to_a = cKDTree(a).query(b)[0]
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def evaluate_labels(
    pred,
    truth,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    n_classes: int | None = None,
    slab: int = 64,
) -> dict[str, Any]:
    """Per-class Dice, IoU, precision, recall, HD95 and volumes of a predicted label volume, slab by slab.

    Only ``slab + 2`` slices of each volume and the surface voxels of each foreground class are held, so a
    paper-size volume evaluates in bounded memory.

    Args:
        pred, truth: (Z, Y, X) integer label volumes (numpy or lazy arrays sliced along z), values in
            [0, 255].
        spacing_mm: voxel size (z, y, x) in millimetres.
        n_classes: number of classes; None takes the largest label present plus one.
        slab: slices per read.

    Returns:
        ``{"confusion": (C, C) list, "spacing_mm": ..., "voxel_mm3": ..., "classes": [...]}``, one entry per
        class with ``label, dice, iou, precision, recall, hd95_mm`` (None for the background, label 0, and
        NaN/inf where a class is missing from one or both volumes) and ``voxels_pred, voxels_truth,
        volume_mm3_pred, volume_mm3_truth``.

    Raises:
        ValueError: different shapes, non-integer labels, or labels outside [0, n_classes).
    """
    if tuple(pred.shape) != tuple(truth.shape) or len(pred.shape) != 3:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}"
        )
    for array in (pred, truth):
        if not np.issubdtype(np.dtype(array.dtype), np.integer):
            raise ValueError(f"labels must be integers, not {np.dtype(array.dtype)}")
    limit = 256 if n_classes is None else n_classes
    depth = pred.shape[0]
    confusion = np.zeros((limit, limit), np.int64)
    surfaces: dict[tuple[int, int], list[np.ndarray]] = {}
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)
        pair = [_slab_labels(array, lo, hi, limit) for array in (pred, truth)]
        part = confusion_matrix(pair[0][z0 - lo : z1 - lo], pair[1][z0 - lo : z1 - lo], limit)
        confusion += part
        present = np.flatnonzero(part.sum(0) + part.sum(1))
        for which, labels in enumerate(pair):
            labels = np.pad(
                labels, [(int(z0 == 0), int(z1 == depth)), (0, 0), (0, 0)]
            )  # outside = background
            for c in present[present > 0]:
                found = surface_voxels(labels == c)
                found[:, 0] += z0
                surfaces.setdefault((which, int(c)), []).append(found)
    if n_classes is None:
        used = np.flatnonzero(confusion.sum(0) + confusion.sum(1))
        n_classes = int(used.max()) + 1 if len(used) else 1
        confusion = confusion[:n_classes, :n_classes]
    return _summary(confusion, surfaces, spacing_mm)


def _slab_labels(array, lo: int, hi: int, limit: int) -> np.ndarray:
    labels = np.asarray(array[lo:hi])
    if labels.size and (labels.min() < 0 or labels.max() >= limit):
        raise ValueError(f"label values must lie in [0, {limit}), found {labels.min()}..{labels.max()}")
    return labels.astype(np.uint8, copy=False)


def _summary(confusion: np.ndarray, surfaces: dict, spacing_mm: Sequence[float]) -> dict[str, Any]:
    voxel_mm3 = float(np.prod(spacing_mm))
    empty = np.zeros((0, 3), np.int32)
    scores = {
        "dice": dice_from_confusion(confusion),
        "iou": iou_from_confusion(confusion),
        "precision": precision_from_confusion(confusion),
        "recall": recall_from_confusion(confusion),
    }
    classes = []
    for c in range(confusion.shape[0]):
        pred_surface, truth_surface = (np.concatenate(surfaces.get((w, c), [empty])) for w in (0, 1))
        entry = {"label": c, **{k: float(v[c]) for k, v in scores.items()}}
        entry["hd95_mm"] = None if c == 0 else hausdorff95_mm(pred_surface, truth_surface, spacing_mm)
        entry["voxels_pred"] = int(confusion[:, c].sum())
        entry["voxels_truth"] = int(confusion[c].sum())
        entry["volume_mm3_pred"] = entry["voxels_pred"] * voxel_mm3
        entry["volume_mm3_truth"] = entry["voxels_truth"] * voxel_mm3
        classes.append(entry)
    return {
        "confusion": confusion.tolist(),
        "spacing_mm": [float(s) for s in spacing_mm],
        "voxel_mm3": voxel_mm3,
        "classes": classes,
    }
