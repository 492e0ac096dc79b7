"""NIfTI-1 ``.nii`` / ``.nii.gz`` through nibabel.

On disk NIfTI stores voxels x fastest with index order (x, y, z), which is exactly the bytes of a C-order
(z, y, x) array: our view is the transpose of nibabel's, and a z slab is one contiguous byte range.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from meunet.errors import InputError
from meunet.io._volume import (
    MM_PER_UNIT,
    LazyArray,
    Volume,
    affine_from_geometry,
    geometry_from_affine,
    require_volume,
)
from meunet.io._writer import RawWriter, holds_all_but_float16

_HEADER_BYTES = 352  # NIfTI-1 single-file header (348) and the 4-byte extension flag


def open_nifti(path: Path) -> Volume:
    """Open a NIfTI file lazily: slab reads go through nibabel's array proxy and read only those bytes.

    Trailing singleton dimensions (an (X, Y, Z, 1) image) are dropped. Data with a scale slope or intercept
    is returned as float32.
    """
    logger = logging.getLogger("nibabel")  # it logs a header it fixes (zero pixdim) on stderr
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return _open_nifti(path)
    finally:
        logger.setLevel(level)


def _open_nifti(path: Path) -> Volume:
    try:
        img = nib.load(path, keep_file_open=True)
        hdr = img.header
        shape = img.shape
        unit = hdr.get_xyzt_units()[0]
    except Exception as exc:  # nibabel raises many types for a bad header
        raise InputError(path, f"not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, "not a NIfTI-1 or NIfTI-2 image")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    require_volume(path, shape, img.get_data_dtype())
    proxy = img.dataobj
    extra = (0,) * (len(img.shape) - 3)
    scaled = not (np.isnan(proxy.slope) or proxy.slope == 1) or not (
        np.isnan(proxy.inter) or proxy.inter == 0
    )
    dtype = np.float32 if scaled else hdr.get_data_dtype().newbyteorder("=")
    if not str(path).endswith(".gz"):
        needed = int(hdr.get_data_offset()) + int(np.prod(img.shape)) * hdr.get_data_dtype().itemsize
        if Path(path).stat().st_size < needed:
            raise InputError(path, f"truncated NIfTI file: {Path(path).stat().st_size} bytes, needs {needed}")
    geometry = geometry_from_affine(img.affine)
    scale = MM_PER_UNIT.get(unit, 1.0) if unit != "unknown" else 1.0
    geometry["spacing"] = tuple(s * scale for s in geometry["spacing"])
    geometry["origin"] = tuple(o * scale for o in geometry["origin"])

    def read(key):
        return proxy[key[::-1] + extra].T

    return Volume(LazyArray(path, shape[::-1], dtype, read), **geometry)


class NiftiWriter(RawWriter):
    """NIfTI-1 writer: header, then raw voxels with ``pwrite``; ``.nii.gz`` is compressed at the end."""

    _holds = staticmethod(holds_all_but_float16)
    max_side = 32767  # NIfTI-1 stores each dimension as a signed 16-bit integer

    @property
    def _raw_path(self) -> Path:
        if self.target.name.endswith(".gz"):
            return self.target.with_name(self.target.name[:-3])
        return self.target

    def _header(self) -> int:
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(self.dtype)
        hdr.set_data_shape(self.shape[::-1])
        affine = affine_from_geometry(self.geometry)
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
        hdr.set_xyzt_units("mm")
        hdr.set_data_offset(_HEADER_BYTES)
        with open(self._raw_path, "wb") as f:
            f.write(hdr.binaryblock)
            f.write(b"\0" * (_HEADER_BYTES - len(hdr.binaryblock)))
        return _HEADER_BYTES

    def _finish(self) -> None:
        if self._raw_path != self.target:
            with (
                open(self._raw_path, "rb") as src,
                gzip.GzipFile(self.target, "wb", compresslevel=1, mtime=0) as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 16)
            self._raw_path.unlink()
