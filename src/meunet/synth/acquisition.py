"""Turning a phantom's intensities into a microCT image, slab by slab.

Two models, both deterministic per slice (every random draw is seeded with the volume seed and the slice
index), so any slab equals the same slices of the whole volume:

- ``fast`` (default), in image space: point-spread blur, noise whose spread grows with the square root of the
  signal (Poisson-like) at a given SNR, correlated over about a voxel; concentric ring offsets around the
  rotation axis (z); radial cupping; quantisation.
- ``physics``: each slice is projected in parallel beam (``skimage.transform.radon``) through three energy
  bins (photoelectric part falling as E^-3, so beam hardening cups the image), Poisson photon counts,
  detector blur and per-pixel gain errors (rings), filtered back-projection (``iradon``). Slices run in a
  process pool.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

TRUNCATE = 4.0
_NOISE, _RINGS, _GAIN = 101, 102, 103
ENERGIES_KEV = (25.0, 35.0, 50.0)
SPECTRUM = (0.3, 0.45, 0.25)
REFERENCE_KEV = 35.0


def default_workers() -> int:
    """Worker processes for ``physics``: min(cores, 4)."""
    return max(1, min(os.cpu_count() or 1, 4))


@dataclass(frozen=True)
class Acquisition:
    """Scanner settings.

    Args:
        snr: tissue-to-background contrast over the noise standard deviation in tissue.
        psf_sigma: Gaussian point-spread (fast) or detector blur (physics), voxels.
        rings: ring-offset amplitude (fast, fraction of the contrast) or gain error (physics, fraction).
        cupping: fractional darkening of the rotation axis against the rim (fast model only; the physics
            model cups through beam hardening).
        physics: use the projection model instead of the image-space one.
        dtype: "uint8" or "uint16", the quantised output.
    """

    snr: float = 10.0
    psf_sigma: float = 0.8
    rings: float = 0.04
    cupping: float = 0.06
    physics: bool = False
    dtype: str = "uint8"

    @property
    def halo(self) -> int:
        """Phantom slices each side a slab needs so that the blur matches the whole volume's (the noise,
        drawn per slice, takes its own halo)."""
        return _radius(self.psf_sigma)

    def to_dict(self) -> dict:
        """Every setting, for ``dataset.json``."""
        return asdict(self)


_NOISE_SIGMA = 0.7


def _radius(sigma: float) -> int:
    """Half-width of scipy's Gaussian kernel for ``sigma`` (truncate 4)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def _quantise(image: np.ndarray, dtype: str) -> np.ndarray:
    top = np.iinfo(np.dtype(dtype)).max
    out = np.clip(image, 0.0, 1.0)
    out *= top
    return np.rint(out, out=out).astype(dtype)


def _radial(shape_yx: tuple[int, int], centre: np.ndarray) -> np.ndarray:
    """(Y, X) float32 distance from the rotation axis at ``centre`` (y, x)."""
    y = np.arange(shape_yx[0], dtype=np.float32)[:, None] - np.float32(centre[0])
    x = np.arange(shape_yx[1], dtype=np.float32)[None, :] - np.float32(centre[1])
    return np.sqrt(y * y + x * x)


class Phantom(Protocol):
    """What the acquisition needs of a phantom (:class:`~meunet.synth.fly.Fly`, ``Porous``)."""

    shape: tuple[int, int, int]
    seed: int
    classes: tuple[str, ...]

    @property
    def reference_levels(self) -> tuple[float, float]: ...

    def render(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]: ...


def scan(phantom: Phantom, acq: Acquisition, z0: int, z1: int, pool: Executor | None = None):
    """Slices [z0, z1) of a phantom as acquired: (image ``acq.dtype``, labels uint8), both (z1 - z0, Y, X).

    The phantom is drawn with ``acq.halo`` more slices each side (clipped to the volume), so the result equals
    the same slices of the whole volume. ``pool`` runs the physics model's slices (None: in this process).
    """
    first, last = max(0, z0 - acq.halo), min(phantom.shape[0], z1 + acq.halo)
    intensity, labels = phantom.render(first, last)
    labels = labels[z0 - first : z1 - first].copy()
    args = (intensity, first, z0, z1, phantom.shape, phantom.reference_levels, acq, phantom.seed)
    image = _physics(*args, pool) if acq.physics else _fast(*args)
    return image, labels


def _fast(intensity, first, z0, z1, shape, levels, acq, seed) -> np.ndarray:
    air, tissue = levels
    contrast = tissue - air
    image = gaussian_filter(intensity, acq.psf_sigma, mode="nearest", truncate=TRUNCATE)
    image = image[z0 - first : z1 - first]
    rng = np.random.default_rng((seed, _RINGS))
    centre = (np.asarray(shape[1:], dtype=float) - 1) / 2 + rng.uniform(-0.03, 0.03, 2) * shape[1]
    radius = _radial(shape[1:], centre)
    rim = float(np.hypot(*shape[1:])) / 2
    image -= air
    image *= 1.0 - acq.cupping * np.clip(1.0 - (radius / rim) ** 2, 0.0, 1.0)
    image += air
    # Poisson-like noise, correlated over about a voxel, from one white-noise slice per z.
    h = _radius(_NOISE_SIGMA)
    za, zb = max(0, z0 - h), min(shape[0], z1 + h)
    white = np.stack(
        [
            np.random.default_rng((seed, _NOISE, z)).standard_normal(shape[1:], np.float32)
            for z in range(za, zb)
        ]
    )
    noise = gaussian_filter(white, _NOISE_SIGMA, mode="nearest", truncate=TRUNCATE)[z0 - za : z1 - za]
    del white
    noise *= np.float32(1.0 / _white_gain(_NOISE_SIGMA))
    noise *= np.sqrt(np.maximum(image, air) / tissue)
    image += np.float32(contrast / acq.snr) * noise
    del noise
    # Rings: thin concentric offsets around the rotation axis, the same in every slice.
    n_rings = max(3, int(rim / 12))
    ring_r = rng.uniform(0, rim, n_rings)
    ring_a = rng.normal(0, acq.rings * contrast, n_rings)
    ring_w = rng.uniform(0.5, 1.2, n_rings)
    rings = np.zeros(shape[1:], dtype=np.float32)
    for r, a, w in zip(ring_r, ring_a, ring_w, strict=True):
        rings += np.float32(a) * np.exp(-0.5 * ((radius - np.float32(r)) / np.float32(w)) ** 2)
    image += rings
    return _quantise(image, acq.dtype)


def _white_gain(sigma: float) -> float:
    """Standard deviation of 3D white noise after a Gaussian blur of ``sigma`` (per unit input)."""
    delta = np.zeros(2 * _radius(sigma) + 1)
    delta[len(delta) // 2] = 1.0
    weights = gaussian_filter1d(delta, sigma, truncate=TRUNCATE)
    return float(np.sum(weights**2) ** 1.5)


def _physics(intensity, first, z0, z1, shape, levels, acq, seed, pool) -> np.ndarray:
    # The detector's blur across rows, i.e. along z, applies to the object before the per-slice projection.
    mu = gaussian_filter1d(intensity, acq.psf_sigma, axis=0, mode="nearest", truncate=TRUNCATE)
    mu = mu[z0 - first : z1 - first]
    jobs = [(mu[i], z0 + i, shape, levels, acq, seed) for i in range(z1 - z0)]
    slices = (
        list(pool.map(_project_slice, *zip(*jobs, strict=True)))
        if pool
        else [_project_slice(*j) for j in jobs]
    )
    return np.stack(slices)


def _project_slice(
    image: np.ndarray,
    z: int,
    shape: tuple[int, int, int],
    levels: tuple[float, float],
    acq: Acquisition,
    seed: int,
) -> np.ndarray:
    """One slice through the physics model: (Y, X) phantom intensities -> (Y, X) ``acq.dtype`` image."""
    from skimage.transform import iradon, radon

    air, tissue = levels
    side = max(image.shape)
    pad = [((side - n) // 2, side - n - (side - n) // 2) for n in image.shape]
    # Attenuation per pixel at the reference energy: the sample's path through tissue sums to about 2.
    scale = 2.0 / ((tissue - air) * 0.4 * side)
    mu = np.pad(np.maximum(image - air, 0.0), pad) * scale
    dense = np.clip(np.pad(image, pad, mode="edge") - air, 0.0, 1.0)
    photo = 0.15 + 0.6 * dense**2  # denser material: more photoelectric absorption
    theta = np.linspace(0.0, 180.0, int(np.ceil(np.pi / 2 * side)), endpoint=False)
    compton = radon(mu * (1.0 - photo), theta, circle=False)
    photoelectric = radon(mu * photo, theta, circle=False)
    n_det = compton.shape[0]
    # Photons at each energy; gains: a per-column pattern shared by all slices plus per-row noise.
    flux = 150.0 * (acq.snr / 10.0) ** 2  # photons per detector pixel: noise close to the fast model's
    gain = 1.0 + np.random.default_rng((seed, _GAIN)).normal(0, acq.rings / 4, n_det)
    rng = np.random.default_rng((seed, _GAIN, z))
    gain += rng.normal(0, acq.rings / 12, n_det)
    counts = np.zeros_like(compton)
    for energy, weight in zip(ENERGIES_KEV, SPECTRUM, strict=True):
        line = compton + (REFERENCE_KEV / energy) ** 3 * photoelectric
        counts += rng.poisson(flux * weight * gain[:, None] * np.exp(-line))
    counts = gaussian_filter1d(counts, acq.psf_sigma, axis=0, mode="nearest", truncate=TRUNCATE)
    projection = -np.log(np.maximum(counts, 1.0) / flux)
    recon = iradon(projection, theta, output_size=side, circle=False, filter_name="ramp")
    recon = recon[pad[0][0] : pad[0][0] + image.shape[0], pad[1][0] : pad[1][0] + image.shape[1]]
    # Back to intensities: the spectrum-weighted attenuation of tissue maps to the tissue level.
    photo_t = 0.15 + 0.6 * (tissue - air) ** 2
    mean_factor = sum(w * (REFERENCE_KEV / e) ** 3 for e, w in zip(ENERGIES_KEV, SPECTRUM, strict=True))
    effective = scale * ((1.0 - photo_t) + photo_t * mean_factor)
    return _quantise((air + recon / effective).astype(np.float32), acq.dtype)
