"""Whole-volume prediction during training, through the streaming engine of :mod:`meunet.infer`:
validation Dice, and the cache of stage-1 probabilities that stage 2 trains on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from meunet.data.normalization import Normalization
from meunet.infer import Input, SlidingWindow, image_input, labels_from_scores, predict_stage1
from meunet.io import atomic_output
from meunet.metrics import confusion_matrix, dice_from_confusion
from meunet.models import Cascade


def validation_dice(
    net: Callable[..., torch.Tensor],
    volumes: Sequence[tuple[Sequence[Input], object]],
    n_classes: int,
    engine: SlidingWindow,
) -> np.ndarray:
    """Dice per class of sliding-window predictions, pooled over all validation volumes.

    Args:
        net: called as ``net(*windows)`` (one float32 tensor (B, C_i, *window) per input), returns logits
            (B, n_classes, *window); put modules in eval mode first.
        volumes: per volume, its network inputs and its (Z, Y, X) label array (read slab by slab).
        n_classes: number of classes C.
        engine: window, overlap, device and precision.

    Returns:
        float64 (C,) Dice per class; NaN for a class absent from both prediction and labels.
    """
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for inputs, labels in volumes:
        for z0, scores in engine.stream(net, inputs, n_classes):
            truth = np.asarray(labels[z0 : z0 + scores.shape[1]])
            confusion += confusion_matrix(labels_from_scores(scores), truth, n_classes)
    return dice_from_confusion(confusion)


def validation_labels(
    net: Callable[..., torch.Tensor], inputs: Sequence[Input], n_classes: int, engine: SlidingWindow
) -> np.ndarray:
    """uint8 (Z, Y, X) labels of one (validation) volume, in memory."""
    return np.concatenate([labels_from_scores(scores) for _, scores in engine.stream(net, inputs, n_classes)])


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_stage1_output(
    cascade: Cascade,
    image,
    normalization: Normalization,
    engine: SlidingWindow,
    path: Path,
    key: dict,
) -> None:
    """Stage-1 output of a whole volume as float16 Zarr (C, Z, Y, X) at ``path``, computed once.

    Written by :func:`meunet.infer.predict_stage1` (slab by slab, temporary name, rename); then ``key`` is
    stored beside it as ``<name>.json``. A cache whose key file matches ``key`` (which should name the
    stage-1 weights' digest, the image and the engine settings) is reused as it is.

    Args:
        cascade: the cascade in eval mode (its frozen stage 1 and ``stage1_output`` are used).
        image: the raw (Z, Y, X) image array (lazy allowed).
        normalization: applied to the image windows.
        engine: window, overlap, blend, device and precision.
        path: the ``.zarr`` folder of the cache.
        key: JSON-serialisable identity of what the cache holds.
    """
    key_file = path.with_suffix(".json")
    tag = json.dumps(key, sort_keys=True)
    if path.exists() and key_file.exists() and key_file.read_text() == tag:
        return
    key_file.unlink(missing_ok=True)
    predict_stage1(cascade, image_input(image, normalization), path, engine, force=True)
    with atomic_output(key_file) as tmp:
        tmp.write_text(tag)
