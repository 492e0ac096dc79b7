"""Segmentation metrics, accumulated slab by slab so paper-size volumes evaluate in bounded memory.

Labels are uint8 arrays (z, y, x) with values in [0, n_classes). Overlap scores come from a confusion matrix
summed over slabs; the surface distance (HD95) from the surface voxels of each class, found slab by slab with
a one-slice halo, so only surfaces (not volumes or bounding boxes) are ever held in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from meunet.errors import InputError
from meunet.io import check_outputs, require_suffix, write_json


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
        pred, truth: (Z, Y, X) label volumes (numpy or lazy arrays sliced along z), values whole numbers
            in [0, 255] (float dtypes accepted, as NIfTI label files often are).
        spacing_mm: voxel size (z, y, x) in millimetres.
        n_classes: number of classes; None takes the largest label present plus one.
        slab: slices per read.

    Returns:
        ``{"confusion": (C, C) list, "spacing_mm": ..., "voxel_mm3": ..., "classes": [...]}``, one entry per
        class with ``label, dice, iou, precision, recall, hd95_mm`` (None for the background, label 0, and
        NaN/inf where a class is missing from one or both volumes) and ``voxels_pred, voxels_truth,
        volume_mm3_pred, volume_mm3_truth``.

    Raises:
        ValueError: different shapes, fractional labels, or labels outside [0, n_classes); the message
            starts with ``prediction`` or ``truth`` where it concerns one of them.
    """
    if tuple(pred.shape) != tuple(truth.shape) or len(pred.shape) != 3:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}"
        )
    limit = 256 if n_classes is None else n_classes
    depth = pred.shape[0]
    confusion = np.zeros((limit, limit), np.int64)
    surfaces: dict[tuple[int, int], list[np.ndarray]] = {}
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)
        pair = [_slab_labels(a, lo, hi, limit, name) for a, name in ((pred, "prediction"), (truth, "truth"))]
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


def _slab_labels(array, lo: int, hi: int, limit: int, name: str) -> np.ndarray:
    """Slices [lo, hi) as uint8, checked: integers (float files must hold whole numbers) in [0, limit)."""
    labels = np.asarray(array[lo:hi])
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{name} labels must be whole numbers, found fractional or NaN values")
    if labels.size and (labels.min() < 0 or labels.max() >= limit):
        raise ValueError(
            f"{name} label values must lie in [0, {limit}), found {labels.min()}..{labels.max()}"
        )
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


def evaluate(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    json_file: str | os.PathLike[str] | None = None,
    overlay: str | os.PathLike[str] | None = None,
    image: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``meunet evaluate``: :func:`evaluate_labels` of two label files, with the truth's spacing.

    Args:
        pred, truth: label volumes in any format :func:`meunet.io.open_volume` reads, same shape.
        class_names: names by label value; also fixes the number of classes (labels must lie below it).
        json_file: write the result as JSON (NaN and inf as null).
        overlay: write a PNG of three orthogonal slices, prediction beside truth
            (:func:`meunet.report.save_overlay`).
        image: the scan (same shape), drawn in grey under the overlay's labels.
        force: overwrite existing ``json_file`` / ``overlay``.

    Returns:
        :func:`evaluate_labels`' dict, each class entry with its ``name`` added.

    Raises:
        InputError: unreadable volumes, different shapes, fractional or out-of-range labels, existing
            outputs.

    >>> result = evaluate(labels_path, labels_path, class_names=["background", "gut", "crop"])
    >>> [(c["name"], c["dice"]) for c in result["classes"]]
    [('background', 1.0), ('gut', 1.0), ('crop', 1.0)]
    """
    from meunet.io import open_volume

    check_outputs((json_file, overlay), force, inputs=(pred, truth, image))
    require_suffix(json_file, ".json", "--json writes JSON")
    require_suffix(overlay, ".png", "the overlay is a PNG")
    volumes = {"prediction": (pred, open_volume(pred)), "truth": (truth, open_volume(truth))}
    if image is not None:
        volumes["image"] = (image, open_volume(image))
    arrays = {name: volume.array for name, (_, volume) in volumes.items()}
    for name in ("prediction", "image"):
        if name in arrays and arrays[name].shape != arrays["truth"].shape:
            raise InputError(
                volumes[name][0],
                f"shape {arrays[name].shape} differs from the truth's {arrays['truth'].shape}",
            )
    spacing = volumes["truth"][1].spacing
    n_classes = None if class_names is None else len(class_names)
    try:
        result = evaluate_labels(arrays["prediction"], arrays["truth"], spacing, n_classes)
    except ValueError as exc:
        name = str(exc).split(" ")[0]
        named = "" if class_names is None else f" (--class-names names {n_classes} classes)"
        raise InputError(volumes[name][0] if name in volumes else pred, f"{exc}{named}") from None
    confusion = np.asarray(result["confusion"])
    predicted, true = (np.flatnonzero(confusion.sum(axis)).max(initial=0) for axis in (0, 1))
    if class_names is None and predicted > true:
        raise InputError(
            pred,
            f"label value {predicted} is above the truth's largest ({true}): is it a label map? "
            "(--class-names gives the classes where the truth lacks some)",
        )
    for entry in result["classes"]:
        c = entry["label"]
        entry["name"] = class_names[c] if class_names is not None else f"label {c}"
    if json_file is not None:
        write_json(json_file, _finite_or_none(result))
    if overlay is not None:
        from meunet.report import save_overlay

        names = [e["name"] for e in result["classes"]]
        save_overlay(arrays["prediction"], arrays["truth"], overlay, spacing, names, arrays.get("image"))
    return result


def _finite_or_none(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
