"""The porous phantom: a cylindrical materials sample (pores 0, matrix 1, dense inclusions 2) in a tube.

The matrix is smoothed value noise above a threshold chosen for the requested porosity; the inclusions are
spheres; the sample stands along z in a thin plastic holder. Every part is a function of absolute voxel
coordinates, so :meth:`Porous.render` draws any z-range on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meunet.synth.shapes import value_noise

CLASSES = ("pore", "matrix", "inclusion")
LEVELS = {"air": 0.08, "matrix": 0.45, "inclusion": 0.78, "holder": 0.2}
_OCTAVES = ((1.0, 1.0), (0.5, 0.5), (0.25, 0.25))  # (cell as a fraction of the base cell, amplitude)


@dataclass
class Porous:
    """A porous sample in a volume of ``shape`` (z, y, x); see :func:`design_porous`. Lengths in voxels."""

    shape: tuple[int, int, int]
    seed: int
    levels: dict[str, float]
    centre: tuple[float, float]  # (y, x) of the sample's axis
    radius: float
    holder: tuple[float, float]  # inner and outer radius of the holder tube
    cell: float
    threshold: float
    spheres: np.ndarray  # (n, 4): z, y, x, radius

    classes = CLASSES

    @property
    def reference_levels(self) -> tuple[float, float]:
        """(background, matrix) intensities: the contrast the acquisition's SNR refers to."""
        return self.levels["air"], self.levels["matrix"]

    def pore_field(self, z0: int, z1: int) -> np.ndarray:
        """(z1 - z0, Y, X) float32 smooth noise; the matrix is where it exceeds ``threshold``."""
        whole = ((0, self.shape[1]), (0, self.shape[2]))
        return sum(
            np.float32(amp)
            * value_noise(z0, z1, *whole, self.shape[1:], self.cell * size, (self.seed, 20 + i))
            for i, (size, amp) in enumerate(_OCTAVES)
        )

    def render(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw slices [z0, z1): (intensity float32, labels uint8), both (z1 - z0, Y, X)."""
        lv = {k: np.float32(v) for k, v in self.levels.items()}
        y = np.arange(self.shape[1], dtype=np.float32)[:, None] - np.float32(self.centre[0])
        x = np.arange(self.shape[2], dtype=np.float32)[None, :] - np.float32(self.centre[1])
        radial = np.sqrt(y * y + x * x)
        img = np.full((z1 - z0, *self.shape[1:]), lv["air"], dtype=np.float32)
        img[:, (radial >= self.holder[0]) & (radial < self.holder[1])] = lv["holder"]
        field = self.pore_field(z0, z1)
        matrix = (field > self.threshold) & (radial < self.radius)
        labels = matrix.astype(np.uint8)
        img[matrix] = lv["matrix"] * (1.0 + 0.3 * (field[matrix] - self.threshold))
        del field, matrix
        near = self.spheres[
            (self.spheres[:, 0] + self.spheres[:, 3] >= z0) & (self.spheres[:, 0] - self.spheres[:, 3] < z1)
        ]
        for cz, cy, cx, r in near:
            lo = [max(int(np.ceil(c - r)), 0) for c in (cz - z0, cy, cx)]
            hi = [min(int(np.floor(c + r)) + 1, n) for c, n in zip((cz - z0, cy, cx), img.shape, strict=True)]
            zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            ball = (zz + z0 - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
            img[box][ball] = lv["inclusion"]
            labels[box][ball] = 2
        return img, labels


def design_porous(
    shape: tuple[int, int, int], seed: int, porosity: float = 0.3, inclusions: float = 0.04
) -> Porous:
    """Draw a random porous sample for a volume of ``shape`` (z, y, x) from ``seed`` (deterministic).

    Args:
        porosity: target pore fraction of the sample (the threshold is fitted on a few slices).
        inclusions: target volume fraction of dense spherical inclusions.
    """
    rng = np.random.default_rng(seed)
    side = min(shape[1:])
    radius = 0.42 * side * rng.uniform(0.9, 1.0)
    centre = (
        (shape[1] - 1) / 2 + rng.uniform(-0.02, 0.02) * side,
        (shape[2] - 1) / 2 + rng.uniform(-0.02, 0.02) * side,
    )
    wall = max(1.5, 0.015 * side)
    holder = (radius + max(1.0, 0.01 * side), radius + max(1.0, 0.01 * side) + wall)
    levels = {k: v * rng.uniform(0.94, 1.06) for k, v in LEVELS.items()}
    cell = max(3.0, 0.08 * side * rng.uniform(0.8, 1.25))
    n_spheres = 0
    radii = []
    sample_volume = np.pi * radius**2 * shape[0]
    while sum(4 / 3 * np.pi * r**3 for r in radii) < inclusions * sample_volume:
        radii.append(max(1.5, 0.04 * radius * rng.lognormal(0.0, 0.4)))
        n_spheres += 1
    radii = np.array(radii)
    angle = rng.uniform(0, 2 * np.pi, n_spheres)
    dist = (radius - radii) * np.sqrt(rng.uniform(0, 1, n_spheres))
    spheres = np.stack(
        [
            rng.uniform(0, shape[0], n_spheres),
            centre[0] + dist * np.sin(angle),
            centre[1] + dist * np.cos(angle),
            radii,
        ],
        axis=1,
    ).reshape(-1, 4)
    porous = Porous(
        tuple(int(s) for s in shape), int(seed), levels, centre, radius, holder, cell, 0.0, spheres
    )
    rows = np.unique(np.linspace(0, shape[0] - 1, 5).astype(int))
    y = np.arange(shape[1])[:, None] - centre[0]
    x = np.arange(shape[2])[None, :] - centre[1]
    inside = np.hypot(y, x) < radius
    samples = np.concatenate([porous.pore_field(z, z + 1)[0][inside] for z in rows])
    porous.threshold = float(np.quantile(samples, porosity))
    return porous
