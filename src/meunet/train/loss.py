"""The W_D loss of docs/method.md section 4: soft Dice plus class-weighted cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(class_counts: np.ndarray) -> torch.Tensor:
    """Cross-entropy weights from voxel counts per class over the kept training patches.

    Inverse class frequencies, normalised to sum 1, then passed through a softmax, so the largest weight is
    at most e times the smallest.

    Args:
        class_counts: (C,) non-negative voxel counts; a class that never occurs counts as one voxel.

    Returns:
        float32 tensor (C,) of weights summing to 1.
    """
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    inverse = counts.sum() / counts
    return torch.softmax(torch.from_numpy(inverse / inverse.sum()), dim=0).float()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """One minus the soft Dice averaged over classes (background included), pooled over the batch.

    Args:
        logits: (N, C, Z, Y, X) any float dtype.
        target: (N, Z, Y, X) integer class labels in [0, C).
        eps: smoothing; a class absent from both prediction and target scores Dice 1.

    Returns:
        float32 scalar in [0, 1].
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


def wd_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """W_D: soft Dice loss plus cross-entropy weighted by ``weights``.

    Args:
        logits: (N, C, Z, Y, X) any float dtype (computed in float32).
        target: (N, Z, Y, X) integer class labels in [0, C).
        weights: (C,) float32 class weights (see :func:`class_weights`), on the logits' device.

    Returns:
        float32 scalar.
    """
    cross_entropy = F.cross_entropy(logits.float(), target.long(), weight=weights)
    return soft_dice_loss(logits, target) + cross_entropy
