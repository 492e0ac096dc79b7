"""Augmentation on the training device: random affine (rotation and isotropic scale about the patch centre)
and flips, drawn once per sample and applied identically to all of that sample's tensors (local and context
patches, images, labels and stage-1 probabilities); intensity transforms of the images (brightness, contrast,
gamma, noise, blur: the shifts that beam hardening, cupping and other scanners cause); and the perturbation
of cached stage-1 probabilities (morphology and removal of components, nnU-Net's cascade augmentation).

Transforms are defined in voxel units about the patch centre, so a local patch and the context patch centred
on the same point stay aligned whatever their sizes. Random numbers come from a CPU ``torch.Generator``
(the transforms' parameters in a fixed count per sample; noise fields only for the samples that get noise),
so a seed gives the same transforms on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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

    def rows(self, first: int, count: int) -> Transforms:
        """The transforms of samples ``first .. first + count - 1``."""
        rows = slice(first, first + count)
        return Transforms(self.matrices[rows], self.affine[rows], self.flips[rows])


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


MORPHOLOGY = ("dilation", "erosion", "opening", "closing")


def _grey(x: torch.Tensor, radius: int, dilate: bool) -> torch.Tensor:
    """Flat grey-level dilation (max) or erosion (min) of (N, 1, Z, Y, X) with a cube of side 2 radius + 1:
    on every threshold level of ``x`` it is the binary operation with that structuring element."""
    sign = 1 if dilate else -1
    return sign * F.max_pool3d(sign * x, 2 * radius + 1, stride=1, padding=radius)


def morphology(x: torch.Tensor, operation: str, radius: int) -> torch.Tensor:
    """Dilation, erosion, opening or closing of a (N, 1, Z, Y, X) map (see :func:`_grey`)."""
    if operation in ("dilation", "erosion"):
        return _grey(x, radius, operation == "dilation")
    first = operation == "closing"  # closing dilates first, opening erodes first
    return _grey(_grey(x, radius, first), radius, not first)


def _set_channel(probs: torch.Tensor, c: int, new: torch.Tensor) -> torch.Tensor:
    """(C, Z, Y, X) probabilities with channel ``c`` replaced by ``new`` (Z, Y, X) in [0, 1] and the other
    channels rescaled to share the rest as they shared it before (all to background where they held none)."""
    others = probs.clone()
    others[c] = 0
    total = others.sum(0)
    empty = total <= 1e-6
    others[0] = torch.where(empty, torch.ones_like(total), others[0])
    others = others / others.sum(0).clamp_min(1e-6) * (1 - new)
    others[c] = new
    return others


def perturb_probabilities(
    probs: torch.Tensor,
    generator: torch.Generator,
    morphology_probability: float = 0.4,
    max_radius: int = 8,
    removal_probability: float = 0.2,
    max_component_fraction: float = 0.15,
    first: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """Perturb cached stage-1 probabilities so that stage 2 learns to correct stage 1 (nnU-Net's cascade
    augmentation, on probabilities).

    Per sample, with chance ``morphology_probability``, every foreground class in random order gets a random
    morphological operation (dilation, erosion, opening or closing; cube of radius 1 to ``max_radius``) of
    its probability map; with chance ``removal_probability``, every foreground class loses one random
    connected component of its argmax region (26-connected, at most ``max_component_fraction`` of the
    patch), its probability set to 0. After each change the other classes share the rest of each voxel's
    probability as before (the background where they held none), so every voxel still sums to 1.

    Args:
        probs: (N, C, Z, Y, X) float probabilities, channel 0 background.
        generator: CPU generator; exactly ``total (2 + 4 (C - 1))`` numbers are drawn, whatever happens.
        first, total: ``probs`` are samples ``first .. first + N - 1`` of a batch of ``total`` (default N),
            the rest of which other processes perturb: the draws are those of the whole batch.

    Returns:
        New (N, C, Z, Y, X) tensor, same dtype and device.
    """
    import cc3d

    n, channels = probs.shape[:2]
    draws = torch.rand(n if total is None else total, 2 + 4 * (channels - 1), generator=generator)
    out = probs.clone()
    for i in range(n):
        sample = probs[i].float()
        d = draws[first + i]
        classes = (torch.argsort(d[2 : 2 + channels - 1]) + 1).tolist()
        if d[0] < morphology_probability:
            for k, c in enumerate(classes):
                operation = MORPHOLOGY[int(d[1 + channels + k] * 4) % 4]
                radius = 1 + int(d[2 * channels + k] * max_radius) % max_radius
                new = morphology(sample[c][None, None], operation, radius)[0, 0]
                sample = _set_channel(sample, c, new)
        if d[1] < removal_probability:
            hard = sample.argmax(0).cpu().numpy().astype(np.uint8)
            for k, c in enumerate(classes):
                components, count = cc3d.connected_components(hard == c, connectivity=26, return_N=True)
                if count == 0:
                    continue
                sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
                small = np.flatnonzero(sizes <= max_component_fraction * hard.size) + 1
                if small.size:
                    pick = int(small[int(d[3 * channels - 1 + k] * small.size) % small.size])
                    mask = torch.from_numpy(components == pick).to(sample.device)
                    sample = _set_channel(sample, c, torch.where(mask, 0.0, sample[c]))
        out[i] = sample.to(probs.dtype)
    return out


INTENSITY_DRAWS = 12  # random numbers per sample drawn by random_intensity


@dataclass(frozen=True)
class Intensity:
    """Per-sample intensity transforms of a batch of N samples (each a float32 (N,) tensor; identity where
    a transform was not drawn).

    Attributes:
        scale, shift: brightness: ``x * scale + shift`` (normalised units).
        contrast: stretch about the patch mean.
        gamma: gamma of the patch rescaled to [0, 1] (then back to its range).
        noise: standard deviation of added Gaussian noise.
        blur: Gaussian blur sigma in voxels (0: none).
    """

    scale: torch.Tensor
    shift: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor
    noise: torch.Tensor
    blur: torch.Tensor


def random_intensity(n: int, probability: float, generator: torch.Generator) -> Intensity:
    """Draw intensity transforms for N samples, each transform applied with chance ``probability`` (gamma
    with twice that): brightness scale 0.75..1.25 and shift +-0.25, contrast 0.75..1.25, gamma 0.7..1.5,
    noise sd 0..0.3, blur sigma 0.5..1.5 (nnU-Net's ranges, plus the additive shift a different scanner or
    beam hardening brings). Exactly ``INTENSITY_DRAWS n`` numbers are drawn from ``generator``."""
    d = torch.rand(n, INTENSITY_DRAWS, generator=generator)
    on = d[:, :6] < probability * torch.tensor([1.0, 1, 1, 2, 1, 1])
    u = d[:, 6:]
    return Intensity(
        scale=torch.where(on[:, 0], 0.75 + 0.5 * u[:, 0], 1.0),
        shift=torch.where(on[:, 1], 0.5 * u[:, 1] - 0.25, 0.0),
        contrast=torch.where(on[:, 2], 0.75 + 0.5 * u[:, 2], 1.0),
        gamma=torch.where(on[:, 3], torch.where(u[:, 3] < 0.5, 0.7 + 0.6 * u[:, 3], u[:, 3] + 0.5), 1.0),
        noise=torch.where(on[:, 4], 0.3 * u[:, 4], 0.0),
        blur=torch.where(on[:, 5], 0.5 + u[:, 5], 0.0),
    )


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, Z, Y, X), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(t)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.reshape(shape))
    return x


def apply_intensity(
    images: list[torch.Tensor], t: Intensity, generator: torch.Generator, first: int = 0
) -> list[torch.Tensor]:
    """Apply :func:`random_intensity`'s transforms to batches of normalised images of the same samples.

    Order: blur, brightness, contrast, gamma, noise. The patch statistics that contrast (mean) and gamma
    (range) use come from the first batch (the local patches), so a sample's local and context patches get
    the same intensity mapping. The noise is drawn on the CPU from ``generator`` (one normal number per
    voxel of every sample with noise), so a seed gives the same result on every device.

    Args:
        images: (N, 1, Z_k, Y_k, X_k) float images of samples ``first .. first + N - 1`` of ``t``'s batch;
            e.g. ``[local, context]``. The noise of the batch's other samples (which other processes
            transform) is drawn and dropped, so ``generator`` ends where the whole batch leaves it.

    Returns:
        New tensors, same shapes, dtypes and devices.
    """
    outs = [x.clone() for x in images]
    for i in range(len(t.scale)):
        j = i - first
        if not 0 <= j < len(images[0]):
            for x in images if t.noise[i] > 0 else ():
                torch.randn((1, *x.shape[1:]), generator=generator)
            continue
        local = _blurred(images[0][j : j + 1], t, i) * float(t.scale[i]) + float(t.shift[i])
        mean = local.mean()
        low, high = local.min(), local.max()
        for out, x in zip(outs, images, strict=True):
            v = _blurred(x[j : j + 1], t, i) * float(t.scale[i]) + float(t.shift[i])
            if t.contrast[i] != 1:
                v = (v - mean) * float(t.contrast[i]) + mean
            if t.gamma[i] != 1:
                span = (high - low) * float(t.contrast[i])
                lo = (low - mean) * float(t.contrast[i]) + mean
                v = ((v - lo) / span.clamp_min(1e-6)).clamp(0, 1) ** float(t.gamma[i]) * span + lo
            if t.noise[i] > 0:
                v = v + float(t.noise[i]) * torch.randn(v.shape, generator=generator).to(v.device, v.dtype)
            out[j : j + 1] = v
    return outs


def _blurred(x: torch.Tensor, t: Intensity, i: int) -> torch.Tensor:
    return _gaussian_blur(x, float(t.blur[i])) if t.blur[i] > 0 else x
