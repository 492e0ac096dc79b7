"""The W_D loss of docs/method.md section 4: soft Dice plus class-weighted cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Across = Callable[[torch.Tensor], torch.Tensor]
DICE_EPS = 1e-5


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


def _dice_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float32 (2, C): per class, the sum over the batch of probability times one-hot (intersection), and of
    probability plus one-hot (total)."""
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))
    return torch.stack([(probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)])


def _dice_loss_of(sums: torch.Tensor, eps: float) -> torch.Tensor:
    intersection, total = sums
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """One minus the soft Dice averaged over classes (background included), pooled over the batch.

    Args:
        logits: (N, C, Z, Y, X) any float dtype.
        target: (N, Z, Y, X) integer class labels in [0, C).
        eps: smoothing; a class absent from both prediction and target scores Dice 1.

    Returns:
        float32 scalar in [0, 1].
    """
    return _dice_loss_of(_dice_sums(logits, target), eps)


def wd_loss(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, across: Across | None = None
) -> torch.Tensor:
    """W_D: soft Dice loss plus cross-entropy weighted by ``weights``.

    Args:
        logits: (N, C, Z, Y, X) any float dtype (computed in float32).
        target: (N, Z, Y, X) integer class labels in [0, C).
        weights: (C,) float32 class weights (see :func:`class_weights`), on the logits' device.
        across: with rows of one global batch on several processes, the differentiable sum over the
            processes (:func:`meunet.ddp.sum_over_ranks`): the Dice and cross-entropy sums are added up
            before the ratios are taken, so every process gets the loss of the whole batch.

    Returns:
        float32 scalar.
    """
    if across is None:
        cross_entropy = F.cross_entropy(logits.float(), target.long(), weight=weights)
        return soft_dice_loss(logits, target) + cross_entropy
    weighted = F.cross_entropy(logits.float(), target.long(), weight=weights, reduction="sum")
    dice = _dice_sums(logits, target)
    sums = across(torch.cat([dice.flatten(), weighted[None], weights[target.long()].sum()[None]]))
    return _dice_loss_of(sums[:-2].view(dice.shape), DICE_EPS) + sums[-2] / sums[-1]
