"""Augmentation on the training device: random affine (rotation and isotropic scale about the patch centre)
and flips, drawn once per sample and applied identically to all of that sample's tensors (local and context
patches, images, labels and stage-1 probabilities), plus the perturbation of cached stage-1 probabilities.

Transforms are defined in voxel units about the patch centre, so a local patch and the context patch centred
on the same point stay aligned whatever their sizes. Random numbers come from a CPU ``torch.Generator`` and
the same count is drawn whatever the outcome, so a seed gives the same transforms on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Transforms:
    """Per-sample transforms of a batch of N samples.

    Attributes:
        matrices: float32 (N, 3, 3) maps an output voxel offset from the patch centre, (z, y, x), to the input
            offset it samples; identity for samples without affine.
        affine: bool (N,) which samples are warped.
        flips: bool (N, 3) which of the z, y, x axes are flipped (after the warp).
    """

    matrices: torch.Tensor
    affine: torch.Tensor
    flips: torch.Tensor


def _rotation(axis: int, angle: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations about one of the (z, y, x) axes by ``angle`` (N,)."""
    n = len(angle)
    m = torch.eye(3).repeat(n, 1, 1)
    i, j = [a for a in range(3) if a != axis]
    c, s = torch.cos(angle), torch.sin(angle)
    m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
    return m


def random_transforms(
    n: int,
    affine_probability: float,
    rotation: float,
    scale: float,
    flips: bool,
    generator: torch.Generator,
) -> Transforms:
    """Draw transforms for N samples.

    Args:
        n: batch size.
        affine_probability: chance a sample is warped (0.2 in the paper).
        rotation: rotation angles uniform in [-rotation, rotation] radians about each axis.
        scale: isotropic scale factor uniform in [1 - scale, 1 + scale].
        flips: flip each axis with probability 0.5.
        generator: CPU generator; exactly ``9 n`` numbers are drawn.
    """
    affine = torch.rand(n, generator=generator) < affine_probability
    angles = (torch.rand(n, 3, generator=generator) * 2 - 1) * rotation
    factor = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    flip = (torch.rand(n, 3, generator=generator) < 0.5) & flips
    matrices = _rotation(0, angles[:, 0]) @ _rotation(1, angles[:, 1]) @ _rotation(2, angles[:, 2])
    matrices = matrices * factor[:, None, None]
    matrices[~affine] = torch.eye(3)
    return Transforms(matrices, affine, flip)


def apply_transforms(
    x: torch.Tensor, transforms: Transforms, mode: str, fill: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Warp and flip a batch.

    Args:
        x: (N, C, Z, Y, X) float tensor on any device.
        transforms: from :func:`random_transforms`, same N.
        mode: ``"bilinear"`` (trilinear, for images and probabilities) or ``"nearest"`` (labels).
        fill: value where the warp samples outside the patch: a number or a (C,) tensor.

    Returns:
        New (N, C, Z, Y, X) tensor, same dtype and device.
    """
    out = x.clone()
    warped = transforms.affine.nonzero().flatten().tolist()
    if warped:
        half = torch.tensor(x.shape[2:], dtype=torch.float32).flip(0) / 2  # (x, y, z) half-extents
        a = transforms.matrices[warped].flip(1, 2)  # (z, y, x) -> (x, y, z) order
        theta = a * half[None, None, :] / half[None, :, None]  # S^-1 A S in normalised coordinates
        theta = torch.cat([theta, torch.zeros(len(warped), 3, 1)], dim=2).to(x.device)
        grid = F.affine_grid(theta, [len(warped), *x.shape[1:]], align_corners=False)
        shift = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1, 1)
        out[warped] = F.grid_sample(x[warped] - shift, grid.to(x.dtype), mode, "zeros", False) + shift
    for i, flip in enumerate(transforms.flips.tolist()):
        dims = [2 + d for d in range(3) if flip[d]]
        if dims:
            out[i] = out[i : i + 1].flip(dims)[0]
    return out


def perturb_probabilities(
    probs: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Randomly erode or dilate the foreground of stage-1 probabilities, so stage 2 learns to correct them.

    Each sample is perturbed with chance ``probability``: its foreground channels are dilated (3x3x3 max) or
    eroded (3x3x3 min), each half the time; then every voxel is renormalised to sum 1, background taking the
    rest.

    Args:
        probs: (N, C, Z, Y, X) float probabilities, channel 0 background.
        probability: chance per sample; exactly ``2 N`` numbers are drawn from ``generator`` (CPU).

    Returns:
        New (N, C, Z, Y, X) tensor, same dtype and device.
    """
    draws = torch.rand(len(probs), 2, generator=generator)
    out = probs.clone()
    for i in (draws[:, 0] < probability).nonzero().flatten().tolist():
        foreground = probs[i : i + 1, 1:].float()
        sign = 1 if draws[i, 1] < 0.5 else -1
        foreground = sign * F.max_pool3d(sign * foreground, 3, stride=1, padding=1)
        background = (1 - foreground.sum(1, keepdim=True)).clamp_min(0)
        both = torch.cat([background, foreground], dim=1)
        out[i] = (both / both.sum(1, keepdim=True).clamp_min(1e-6))[0].to(probs.dtype)
    return out
