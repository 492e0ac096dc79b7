"""Whole-volume prediction during training, through the streaming engine of :mod:`meunet.infer`:
validation Dice, and the cache of stage-1 probabilities that stage 2 trains on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from meunet.data.normalization import Normalization
from meunet.infer import Input, SlidingWindow, labels_from_scores
from meunet.metrics import confusion_matrix, dice_from_confusion


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


def image_input(image, normalization: Normalization) -> Input:
    """The engine input of a raw (Z, Y, X) image: raw zeros past the border, then normalisation."""
    return Input(image, normalization.apply, 0.0)


def probability_input(probabilities) -> Input:
    """The engine input of cached (C, Z, Y, X) float16 probabilities: one-hot background past the border."""
    return Input(probabilities, None, (1.0, *[0.0] * (probabilities.shape[0] - 1)))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_stage1_probabilities(
    stage1: torch.nn.Module,
    image,
    normalization: Normalization,
    engine: SlidingWindow,
    path: Path,
    key: dict,
) -> zarr.Array:
    """Stage-1 softmax probabilities of a whole volume, float16 Zarr (C, Z, Y, X), computed once.

    A Zarr at ``path`` whose ``meunet_stage1`` attribute equals ``key`` (which should name the weights'
    digest, the image and the engine settings) is reused; otherwise it is computed slab by slab, written
    to a temporary name and renamed over ``path``.

    Args:
        stage1: the stage-1 network in eval mode; ``stage1(window)`` returns logits.
        image: the raw (Z, Y, X) image array (lazy allowed).
        normalization: applied to the image windows.
        engine: window, overlap, blend, device and precision.
        path: where the cache lives.
        key: JSON-serialisable identity of what the cache holds.
    """
    tag = json.dumps(key, sort_keys=True)
    if path.exists():
        cached = zarr.open_array(path, mode="r")
        if cached.attrs.get("meunet_stage1") == tag:
            return cached
    n_classes = stage1.spec["n_classes"]
    shape = (n_classes, *image.shape)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    chunks = (n_classes, *(min(64, s) for s in image.shape))
    out = zarr.create_array(tmp, shape=shape, chunks=chunks, dtype="float16", fill_value=0)
    for z0, scores in engine.stream(stage1, [image_input(image, normalization)], n_classes):
        out[:, z0 : z0 + scores.shape[1]] = engine.probabilities_(scores).astype(np.float16)
    out.attrs["meunet_stage1"] = tag
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return zarr.open_array(path, mode="r")
