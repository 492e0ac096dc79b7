"""Analytic shapes and noise fields evaluated on any z-range of a volume.

Everything here is a function of absolute voxel coordinates (z, y, x), so a slab [z0, z1) computed on its own
equals the same slices of the whole volume: shapes are signed distance functions (SDFs, negative inside, in
voxels) and noise is lattice value noise whose lattice values are seeded by their own lattice index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

Box = tuple[slice, slice, slice]


def box_in_slab(lo: np.ndarray, hi: np.ndarray, z0: int, z1: int, shape_yx: tuple[int, int]) -> Box | None:
    """Slab-relative slices of the voxels whose centres lie in the world box [lo, hi] (z, y, x), or None.

    The slab holds slices [z0, z1) and the whole (y, x) extent ``shape_yx``.
    """
    limits = ((z0, z1), (0, shape_yx[0]), (0, shape_yx[1]))
    out = []
    for (a, b), low, high in zip(limits, lo, hi, strict=True):
        start, stop = max(a, int(np.ceil(low))), min(b, int(np.floor(high)) + 1)
        if start >= stop:
            return None
        out.append(slice(start - a, stop - a))
    return tuple(out)


def box_coords(box: Box, z0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates of a slab-relative box: broadcastable float32 arrays (dz,1,1), (1,dy,1), (1,1,dx)."""
    zs, ys, xs = box
    z = np.arange(zs.start + z0, zs.stop + z0, dtype=np.float32)[:, None, None]
    y = np.arange(ys.start, ys.stop, dtype=np.float32)[None, :, None]
    x = np.arange(xs.start, xs.stop, dtype=np.float32)[None, None, :]
    return z, y, x


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in voxel coordinates.

    Args:
        center: (3,) centre, (z, y, x) voxels.
        axes: (3,) semi-axes in voxels, along the columns of ``rotation``.
        rotation: (3, 3) orthonormal; column j is the direction of semi-axis j in (z, y, x).
    """

    center: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray

    def bbox(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """World (z, y, x) bounding box grown by ``margin`` voxels."""
        extent = np.sqrt(((self.rotation * self.axes[None, :]) ** 2).sum(axis=1)) + margin
        return self.center - extent, self.center + extent

    def sdf(self, box: Box, z0: int) -> np.ndarray:
        """Approximate signed distance (voxels, float32) on a slab-relative box of the slab starting at z0."""
        return self.sdf_at(*box_coords(box, z0)).astype(np.float32, copy=False)

    def sdf_at(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Approximate signed distance at broadcastable world coordinates (voxels), fast.

        k0 (k0 - 1) / k1 (k0 = |q/a|, k1 = |q/a^2|): exact on the surface and close to it nearby; deep inside
        it can exceed the true depth by up to the axis ratio (use :meth:`distance` where that matters).
        """
        coords = (z, y, x)
        k0 = k1 = 0.0
        for j in range(3):
            q = sum(
                np.float32(self.rotation[i, j]) * (coords[i] - np.float32(self.center[i])) for i in range(3)
            )
            a = np.float32(self.axes[j])
            k0 = k0 + (q / a) ** 2
            k1 = k1 + (q / (a * a)) ** 2
        k0 = np.sqrt(k0)
        return k0 * (k0 - 1.0) / np.maximum(np.sqrt(k1), np.float32(1e-12))

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Exact signed distance (float64, (n,)) of (n, 3) world points, by bisection on the foot point.

        The foot point is x_i = a_i^2 q_i / (a_i^2 + t) with t the root of sum (a_i q_i / (a_i^2 + t))^2 = 1,
        in (-min(a)^2, 0) inside and (0, max(a) |q|) outside.
        """
        q = (np.asarray(points, dtype=float) - self.center) @ self.rotation
        q = np.where(np.abs(q) < 1e-4, 1e-4, q)  # off the symmetry planes, where the root always exists
        a2 = self.axes**2
        k0 = np.sqrt(((q / self.axes) ** 2).sum(axis=1))
        inside = k0 < 1.0
        lo = np.where(inside, -a2.min() * (1 - 1e-12), 0.0)
        hi = np.where(inside, 0.0, self.axes.max() * np.linalg.norm(q, axis=1) + 1e-9)
        for _ in range(64):
            t = 0.5 * (lo + hi)
            f = (a2 * q**2 / (a2 + t[:, None]) ** 2).sum(axis=1) - 1.0
            lo, hi = np.where(f > 0, t, lo), np.where(f > 0, hi, t)
        foot = a2 * q / (a2 + 0.5 * (lo + hi)[:, None])
        dist = np.linalg.norm(q - foot, axis=1)
        return np.where(inside, -dist, dist)


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two SDFs with blend width ``k`` voxels (a fillet where they meet)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - np.float32(k) * h * (1.0 - h)


@dataclass
class Tube:
    """A tube of varying radius around a densely sampled curve (sample spacing well below the radius).

    Args:
        points: (n, 3) curve samples, (z, y, x) voxels.
        radii: (n,) radius at each sample, voxels.
        reach: distance beyond the surface (voxels) up to which :meth:`sdf` is exact; farther is +inf.
    """

    points: np.ndarray
    radii: np.ndarray
    reach: float = 0.0
    _tree: cKDTree = field(init=False, repr=False)
    _chunks: list[tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tree = cKDTree(self.points)
        self._chunks = []
        for start in range(0, len(self.points), 32):
            pts = self.points[start : start + 33]
            grow = float(self.radii[start : start + 33].max()) + self.reach + 1.0
            self._chunks.append((pts.min(axis=0) - grow, pts.max(axis=0) + grow))

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        """World (z, y, x) box holding every voxel within ``reach`` of the tube."""
        grow = float(self.radii.max()) + self.reach + 1.0
        return self.points.min(axis=0) - grow, self.points.max(axis=0) + grow

    def sdf(self, z0: int, z1: int, shape_yx: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance to the tube on slab [z0, z1) (float32, (z1-z0, Y, X); +inf beyond ``reach``).

        Returns:
            (sdf, nearest): ``nearest`` (int32, same shape) is the index of the closest curve sample, -1 where
            the distance is +inf. Only voxels in the boxes of nearby curve pieces are queried.
        """
        shape = (z1 - z0, *shape_yx)
        near = np.zeros(shape, dtype=bool)
        for lo, hi in self._chunks:
            box = box_in_slab(lo, hi, z0, z1, shape_yx)
            if box is not None:
                near[box] = True
        sdf = np.full(shape, np.inf, dtype=np.float32)
        nearest = np.full(shape, -1, dtype=np.int32)
        where = np.nonzero(near)
        if where[0].size:
            query = np.stack(where, axis=1).astype(np.float32)
            query[:, 0] += z0
            bound = float(self.radii.max()) + self.reach
            dist, index = self._tree.query(query, distance_upper_bound=bound)
            hit = index < len(self.points)
            index = index[hit]
            hit_where = tuple(w[hit] for w in where)
            sdf[hit_where] = dist[hit] - self.radii[index]
            nearest[hit_where] = index
        return sdf, nearest


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    """(4, n) float32 cubic B-spline weights of lattice nodes k-1 .. k+2 at fractional positions ``t``."""
    t2, t3 = t * t, t * t * t
    return (np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3]) / 6).astype(
        np.float32
    )


# The B-spline averages four nodes per axis (each uniform in [-1, 1]); this brings the field's std to 1/3.
_GAIN = float(np.mean((_bspline_weights(np.linspace(0, 1, 1001)) ** 2).sum(axis=0)) ** -1.5) / np.sqrt(3)


def value_noise(
    z0: int,
    z1: int,
    y_range: tuple[int, int],
    x_range: tuple[int, int],
    shape_yx: tuple[int, int],
    cell: float,
    key: tuple[int, ...],
) -> np.ndarray:
    """Smooth random field (float32, mean 0, std 1/3) on voxels [z0:z1, y0:y1, x0:x1], features of about
    ``cell`` voxels.

    Lattice nodes lie every ``cell`` voxels (with a random phase drawn from ``key``); the node values of
    lattice plane k (covering the volume's whole (y, x) extent ``shape_yx``) come from a generator seeded
    with (*key, k) and are blended by cubic B-splines (smooth, no lattice squares), so any sub-box gets
    exactly the whole volume's values.
    """
    phase = np.random.default_rng((*key, 1 << 30)).random(3) * cell
    axes = []
    for (a, b), off in zip(((z0, z1), y_range, x_range), phase, strict=True):
        t = (np.arange(a, b, dtype=np.float64) + off) / cell
        k = np.floor(t).astype(np.int64)  # >= 0; node k + m - 1 is stored at index k + m
        axes.append((k, _bspline_weights(t - k)))
    (kz, wz), (ky, wy), (kx, wx) = axes
    plane_shape = (int(shape_yx[0] / cell) + 5, int(shape_yx[1] / cell) + 5)
    ys, xs = slice(int(ky[0]), int(ky[-1]) + 4), slice(int(kx[0]), int(kx[-1]) + 4)
    lattice = np.stack(
        [
            (np.random.default_rng((*key, k)).random(plane_shape, dtype=np.float32) * 2.0 - 1.0)[ys, xs]
            for k in range(int(kz[0]), int(kz[-1]) + 4)
        ]
    )
    iz, iy, ix = kz - kz[0], ky - ky[0], kx - kx[0]
    out = sum(lattice[iz + m] * wz[m][:, None, None] for m in range(4))
    out = sum(out[:, iy + m] * wy[m][None, :, None] for m in range(4))
    out = sum(out[:, :, ix + m] * wx[m] for m in range(4))
    out *= np.float32(_GAIN)
    return out
