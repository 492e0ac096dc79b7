"""Segmentation metrics, accumulated slab by slab so paper-size volumes evaluate in bounded memory.

Labels are uint8 arrays (z, y, x) with values in [0, n_classes).
"""

from __future__ import annotations

import numpy as np


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
