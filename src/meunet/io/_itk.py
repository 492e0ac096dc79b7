"""NRRD, MetaImage (``.mha`` / ``.mhd``) and DICOM series through SimpleITK.

MetaImage opens lazily: ITK's MetaImage reader streams the requested z range (``SetExtractIndex``). NRRD and
DICOM are read whole (ITK's NRRD reader would read the whole file for every slab). All three are written from
a whole in-memory volume. Geometry follows ITK (LPS), reversed into (z, y, x) order.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meunet.errors import InputError
from meunet.io._volume import (
    LazyArray,
    Volume,
    check_geometry,
    geometry_from_itk,
    geometry_to_itk,
    require_volume,
)
from meunet.io._writer import VolumeWriter, holds_all_but_float16


def _volume_from_image(path: Path, image: sitk.Image) -> Volume:
    dims = image.GetDimension() + (image.GetNumberOfComponentsPerPixel() > 1)
    if dims != 3:
        raise InputError(path, f"not a 3D volume: the image has {dims} dimensions, size {image.GetSize()}")
    geometry = geometry_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    array = sitk.GetArrayFromImage(image)
    require_volume(path, array.shape, array.dtype)
    return Volume(array, **geometry)


def _check_metaimage_bytes(path: Path, reader: sitk.ImageFileReader) -> None:
    """Raise InputError where a MetaImage's data (after its header, or in its ``.raw`` file) is shorter than
    its header promises: ITK would print its own text on stderr and fail on the first slab read."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    keys, start = {}, None
    for line in head.splitlines(keepends=True):
        key, _, value = line.decode("latin-1").partition("=")
        keys[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            start = head.index(line) + len(line)
            break
    data_file = keys.get("ElementDataFile", "")
    if start is None or data_file == "LIST" or "%" in data_file or " " in data_file:
        return  # slice lists and file patterns: ITK checks each file
    voxel = sitk.Image([1, 1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
    expected = int(np.prod(reader.GetSize())) * sitk.GetArrayViewFromImage(voxel).nbytes
    if keys.get("CompressedData", "False").lower() == "true":
        expected = int(keys.get("CompressedDataSize", 0) or 0)
    data = path if data_file == "LOCAL" else path.parent / data_file
    if not data.is_file():
        raise InputError(data, f"missing: {path.name} names it as its data file")
    found = data.stat().st_size - (start if data_file == "LOCAL" else 0)
    if found < expected:
        raise InputError(data, f"truncated MetaImage data: {found} bytes, the header promises {expected}")


def open_metaimage(path: Path) -> Volume:
    """Open a MetaImage lazily: each slab read asks ITK for that z range only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"not a readable image ({str(exc).strip().splitlines()[-1]})") from exc
    size = reader.GetSize()
    dims = len(size) + (reader.GetNumberOfComponents() > 1)
    if dims != 3:
        raise InputError(path, f"not a 3D volume: the image has {dims} dimensions, size {size}")
    _check_metaimage_bytes(path, reader)
    geometry = geometry_from_itk(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    fix = "ITK reads no voxel of it: correct ElementSpacing in the header"
    check_geometry(path, Volume(np.broadcast_to(np.uint8(0), size[::-1]), **geometry), fix)

    def extract(z0: int, z1: int) -> np.ndarray:
        reader.SetExtractIndex([0, 0, z0])
        reader.SetExtractSize([size[0], size[1], z1 - z0])
        try:
            return sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError as exc:
            raise InputError(
                path, f"truncated or corrupt image ({str(exc).strip().splitlines()[-1]})"
            ) from exc

    def read(key):
        zk, yk, xk = key
        if isinstance(zk, int):
            return extract(zk, zk + 1)[0, yk, xk]
        picked = np.arange(size[2])[zk]
        if not len(picked):
            return np.empty((0, size[1], size[0]), dtype)[:, yk, xk]
        lo = int(picked.min())
        return extract(lo, int(picked.max()) + 1)[picked - lo][:, yk, xk]

    dtype = extract(0, 1).dtype
    require_volume(path, size[::-1], dtype)
    return Volume(LazyArray(path, size[::-1], dtype, read), **geometry)


def read_itk(path: Path) -> Volume:
    """Read a NRRD file whole (numpy array in memory)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable image ({str(exc).strip().splitlines()[-1]})") from exc
    return _volume_from_image(path, image)


def dicom_series(folder: Path) -> list[str]:
    """File names of the single DICOM series in ``folder``, in slice order ([] when there is none)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr of a folder without DICOM
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if len(ids) > 1:
            raise InputError(folder, f"the folder holds {len(ids)} DICOM series; give a folder with one")
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])) if ids else []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_dicom(folder: Path) -> Volume:
    """Read a DICOM series folder whole (numpy array in memory)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series(folder))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            folder, f"not a readable DICOM series ({str(exc).strip().splitlines()[-1]})"
        ) from exc
    return _volume_from_image(folder, image)


class ItkWriter(VolumeWriter):
    """NRRD / MetaImage writer: slabs fill an in-memory volume, SimpleITK writes it at the end."""

    _holds = staticmethod(holds_all_but_float16)

    def _create(self) -> dict:
        self._buffer = np.zeros(self.shape, self.dtype)
        return {}

    def _write(self, z0: int, slab: np.ndarray) -> None:
        self._buffer[z0 : z0 + slab.shape[0]] = slab

    def _finish(self) -> None:
        image = sitk.GetImageFromArray(self._buffer)
        spacing, origin, direction = geometry_to_itk(self.geometry)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        try:
            with _c_stderr_silenced():  # MetaImage's library prints its own line of a failed write
                sitk.WriteImage(image, str(self.target))
        except RuntimeError as exc:  # ITK's message names no errno: a full disk is the free space it lacks
            if shutil.disk_usage(self.target.parent).free < self._buffer.nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            first = next((line for line in str(exc).splitlines() if line.strip()), "SimpleITK failed")
            raise InputError(self.path, f"cannot write: {first.strip()}"[:300]) from None

    def _release(self) -> None:
        self._buffer = None


@contextmanager
def _c_stderr_silenced() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 nowhere while the block runs (the error, if any, is
    raised as one line by the caller)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
