import math

import numpy as np
import torch
import torch.nn.functional as F

from meunet.train.loss import class_weights, soft_dice_loss, wd_loss


def test_weights_favour_rare_classes_within_e():
    w = class_weights(np.array([10_000_000, 5000, 10]))
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert w[2] > w[1] > w[0]
    assert w.max() / w.min() <= math.e + 1e-6
    assert torch.allclose(class_weights(np.array([7, 7, 7])), torch.full((3,), 1 / 3))
    assert torch.isfinite(class_weights(np.array([100, 0]))).all()  # an absent class counts as one voxel


def test_dice_is_perfect_at_a_perfect_prediction():
    target = torch.randint(0, 3, (2, 6, 7, 8))
    target[target == 2] = 1  # class 2 absent from both: counts as perfect
    logits = 100 * F.one_hot(target, 3).movedim(-1, 1).float()
    assert soft_dice_loss(logits, target) < 1e-6
    assert soft_dice_loss(-logits, target) > 0.6
    weights = class_weights(np.array([1, 1, 1]))
    assert wd_loss(logits, target, weights) < 1e-6


def test_wd_is_dice_plus_weighted_cross_entropy_and_differentiable():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    weights = torch.tensor([0.2, 0.3, 0.5])
    loss = wd_loss(logits, target, weights)
    expected = soft_dice_loss(logits, target) + F.cross_entropy(logits, target, weight=weights)
    assert torch.isclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert wd_loss(logits.bfloat16(), target, weights).dtype == torch.float32
