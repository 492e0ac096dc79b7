"""The :class:`Volume` record, the lazy array wrapper and the geometry conventions shared by all formats.

Geometry convention: every vector is listed in (z, y, x) order, like the array axes. World coordinates are
ITK's LPS frame (x to the patient's Left, y Posterior, z Superior), listed in that same reversed order, so
``origin[0]`` is the LPS z coordinate. ``direction[:, k]`` is the world direction of array axis k. A voxel
index ``(i, j, k)`` (z, y, x) sits at ``origin + direction @ (spacing * (i, j, k))``. With this convention an
ITK image with identity direction has identity direction here too.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

from meunet.errors import InputError

Key = tuple[slice | int, slice | int, slice | int]

# millimetres per unit, for the unit names found in ImageJ, OME-TIFF, OME-Zarr and NIfTI metadata
MM_PER_UNIT = {
    "mm": 1.0,
    "millimeter": 1.0,
    "millimetre": 1.0,
    "um": 1e-3,
    "µm": 1e-3,
    "\u03bcm": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "micrometre": 1e-3,
    "nm": 1e-6,
    "nanometer": 1e-6,
    "nanometre": 1e-6,
    "cm": 10.0,
    "centimeter": 10.0,
    "m": 1e3,
    "meter": 1e3,
    "metre": 1e3,
    "inch": 25.4,
    "angstrom": 1e-7,
}


@dataclass
class Volume:
    """A 3D image and its geometry.

    Attributes:
        array: (Z, Y, X) voxels; a numpy array, or a lazy array-like (``.shape``, ``.dtype``, ``.ndim``, and
            basic slicing such as ``array[z0:z1]`` returning a new numpy array) that reads from the file.
        spacing: voxel size (z, y, x) in millimetres.
        origin: world position (z, y, x order, LPS frame) of voxel (0, 0, 0) in millimetres.
        direction: 3x3 float64; column k is the unit world direction (z, y, x order, LPS) of array axis k.
    """

    array: Any
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if len(self.array.shape) != 3:
            raise ValueError(f"a Volume needs a 3D (z, y, x) array, got shape {tuple(self.array.shape)}")
        self.spacing = _triple(self.spacing, "spacing")
        self.origin = _triple(self.origin, "origin")
        self.direction = np.array(self.direction, dtype=np.float64).reshape(3, 3)


def _triple(values, name: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name} needs 3 values (z, y, x), got {values!r}")
    return out  # type: ignore[return-value]


def expand_key(key, shape: tuple[int, ...]) -> Key:
    """Normalise a basic-slicing key for a 3D array to exactly three slices or non-negative ints."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1 :]
    key = key + (slice(None),) * (3 - len(key))
    if len(key) != 3:
        raise IndexError(f"too many indices for a 3D array: {key!r}")
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            out.append(k)
        elif isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            out.append(i)
        else:
            raise IndexError(f"only basic slicing (ints and slices) is supported, got {k!r}")
    return tuple(out)  # type: ignore[return-value]


class LazyArray:
    """A read-only (Z, Y, X) array-like whose voxels stay in the file until sliced.

    ``array[key]`` with basic slicing returns a new C-contiguous numpy array holding only the selected voxels.
    Read errors (a truncated or corrupt file) raise :class:`InputError` naming the file.
    """

    def __init__(self, path: str | PathLike[str], shape, dtype, read: Callable[[Key], np.ndarray]):
        self.path = str(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._read = read
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes the whole array would take in memory."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = expand_key(key, self.shape)
        try:
            with self._lock:
                data = self._read(key)
        except (OSError, EOFError, ValueError, IndexError, zlib.error) as exc:
            raise InputError(self.path, f"truncated or corrupt file ({exc})") from exc
        return np.ascontiguousarray(data, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyArray({self.path!r}, shape={self.shape}, dtype={self.dtype})"


def raw_reader(path: str | PathLike[str], offset: int, shape, dtype) -> Callable[[Key], np.ndarray]:
    """Slab reader for voxels stored as one C-order (Z, Y, X) block at byte ``offset`` (npy, TIFF).

    Reads with ``pread`` only the rows asked for (whole rows of x), so neither memory nor resident set grow
    with the file as they would through a memory map.
    """
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    row_bytes = shape[2] * dtype.itemsize
    slice_bytes = shape[1] * row_bytes

    def read(key: Key) -> np.ndarray:
        zs, ys = np.arange(shape[0])[key[0]], np.arange(shape[1])[key[1]]  # scalar or 1D each
        zl, yl = np.atleast_1d(zs), np.atleast_1d(ys)
        if not zl.size or not yl.size:
            return np.array(np.broadcast_to(np.zeros((), dtype), shape)[key])
        y0, y1 = int(yl.min()), int(yl.max()) + 1
        block = np.empty((zl.size, y1 - y0, shape[2]), dtype)
        with open(path, "rb", buffering=0) as f:
            if y1 - y0 == shape[1] and np.all(np.diff(zl) == 1):  # consecutive whole slices: one read
                _pread_into(f, block, offset + int(zl[0]) * slice_bytes)
            else:
                for i, z in enumerate(zl):
                    _pread_into(f, block[i], offset + int(z) * slice_bytes + y0 * row_bytes)
        rows = 0 if np.ndim(ys) == 0 else slice(None) if np.all(np.diff(yl) == 1) else yl - y0
        out = block[:, rows, key[2]]  # no copy unless rows are picked with a step or backwards
        return out[0] if np.ndim(zs) == 0 else out

    return read


def _pread_into(f, out: np.ndarray, at: int) -> None:
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], at + done)
        if n == 0:
            raise EOFError(f"file ends at byte {at + done}, voxel data go on to byte {at + len(view)}")
        done += n


# ITK images list vectors in (x, y, z) order; ours are (z, y, x): reverse vectors, and reverse both the rows
# and the columns of the direction matrix.
def geometry_from_itk(spacing_xyz, origin_xyz, direction_xyz) -> dict:
    """Volume geometry keywords from ITK's (x, y, z) spacing, origin and row-major 3x3 direction (LPS)."""
    d = np.asarray(direction_xyz, dtype=np.float64).reshape(3, 3)
    return {
        "spacing": tuple(float(v) for v in spacing_xyz)[::-1],
        "origin": tuple(float(v) for v in origin_xyz)[::-1],
        "direction": d[::-1, ::-1].copy(),
    }


def geometry_to_itk(volume: Volume) -> tuple[tuple, tuple, tuple]:
    """ITK (spacing, origin, direction) tuples, (x, y, z) order and row-major direction, of a volume."""
    return (
        volume.spacing[::-1],
        volume.origin[::-1],
        tuple(float(v) for v in volume.direction[::-1, ::-1].ravel()),
    )


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def geometry_from_affine(affine: np.ndarray) -> dict:
    """Volume geometry keywords from a NIfTI 4x4 affine (voxel (i, j, k) = (x, y, z) index -> RAS mm)."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = _RAS_TO_LPS @ affine[:3, :3]
    m = lps[::-1, ::-1]  # rows: world (z, y, x); columns: array axes (z, y, x)
    with np.errstate(invalid="ignore", divide="ignore"):  # a degenerate affine: check_geometry refuses it
        spacing = np.linalg.norm(m, axis=0)
        return {
            "spacing": tuple(float(s) for s in spacing),
            "origin": tuple(float(v) for v in (_RAS_TO_LPS @ affine[:3, 3])[::-1]),
            "direction": m / spacing,
        }


def affine_from_geometry(volume: Volume) -> np.ndarray:
    """The NIfTI 4x4 affine (voxel (x, y, z) index -> RAS mm) of a volume's geometry."""
    m = volume.direction * np.asarray(volume.spacing)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ m[::-1, ::-1]
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(volume.origin)[::-1]
    return affine


def require_volume(path, shape, dtype) -> None:
    """Raise :class:`InputError` unless ``shape`` is 3D and ``dtype`` holds real numbers (bool, integers or
    floats: not complex, text, dates, records or objects)."""
    if len(shape) != 3:
        raise InputError(
            path, f"not a 3D volume: the array has {len(shape)} dimensions, shape {tuple(shape)}"
        )
    if 0 in tuple(shape):
        raise InputError(path, f"holds no voxels: shape {tuple(shape)}")
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputError(path, f"unsupported voxel type {dtype}: meunet reads bool, integer or float voxels")


def require_finite(path, z0: int, slab: np.ndarray, z_axis: int = 0) -> None:
    """Raise :class:`InputError` naming the first slice holding a NaN or infinite voxel of a float slab.

    ``slab`` starts at slice ``z0`` of the volume read from ``path``; its z axis is ``z_axis`` (1 for a
    (C, dz, Y, X) slab). A float64 voxel beyond float32's range (meunet computes in float32) is refused
    too. Integer slabs always pass.
    """
    if slab.dtype.kind == "f" and not np.isfinite(slab).all():
        z = z0 + int(np.argwhere(~np.isfinite(slab))[0][z_axis])
        raise InputError(path, f"NaN or infinite voxel in slice z = {z}")
    if slab.dtype.itemsize > 4 and slab.dtype.kind == "f" and (beyond := np.abs(slab) > FLOAT32_MAX).any():
        z = z0 + int(np.argwhere(beyond)[0][z_axis])
        raise InputError(
            path, f"voxel beyond float32's range (+-3.4e38) in slice z = {z}: meunet computes in float32"
        )


FLOAT32_MAX = float(np.finfo(np.float32).max)  # NIfTI, TIFF and ITK headers store float32


def fits_float32(values, positive: bool = False) -> bool:
    """Whether every value is finite and fits float32 (and, with ``positive``, is above 0)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.abs(values) <= FLOAT32_MAX):
        return False
    return not positive or bool(np.all(values.astype(np.float32) > 0))  # 1e-46 is 0 in float32


def check_geometry(path, volume: Volume, fix: str = "meunet convert --spacing Z Y X replaces it") -> None:
    """Raise :class:`InputError` unless the spacing is positive, the origin and direction are finite (all
    within float32, which every format can store) and the direction matrix is invertible; ``fix`` ends the
    message of a bad spacing."""
    if not fits_float32(volume.spacing, positive=True):
        spacing = " x ".join(f"{s:g}" for s in volume.spacing)
        raise InputError(
            path,
            f"voxel spacing {spacing} mm (z, y, x) is not positive and finite ({fix})",
        )
    if not fits_float32(volume.origin):
        raise InputError(path, f"origin {', '.join(f'{o:g}' for o in volume.origin)} mm is not finite")
    if not fits_float32(volume.direction) or abs(np.linalg.det(volume.direction)) < 1e-6:
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in volume.direction)
        raise InputError(path, f"direction matrix {rows} is singular or not finite")
