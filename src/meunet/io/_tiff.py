"""TIFF: one multi-page file, or a folder of 2D slices, through tifffile.

Spacing comes from ImageJ metadata (``spacing`` for z, the X/YResolution tags for x and y, ``unit``) or from
OME-XML ``PhysicalSize*``; other TIFFs carry no trustworthy spacing and read as 1 mm unless the user gives
one. Without a z spacing the volume is taken as isotropic (z = x spacing). Writes are uncompressed and
contiguous: ImageJ hyperstacks for uint8, uint16, int16 and float32, OME-TIFF otherwise, BigTIFF (OME) from
4 GB on.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from meunet.errors import InputError
from meunet.io._volume import MM_PER_UNIT, LazyArray, Volume, raw_reader, require_volume
from meunet.io._writer import RawWriter, VolumeWriter, holds_all_but_float16

TIFF_SUFFIXES = (".tif", ".tiff")
_IMAGEJ_DTYPES = {np.dtype(t) for t in ("uint8", "uint16", "int16", "float32")}
_BIGTIFF_FROM = 2**32 - 2**25
# tifffile logs damaged-file findings as errors; meunet reports such files as one InputError line instead
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def _holds(dtype: np.dtype) -> bool:
    """TIFF (ImageJ or OME metadata) holds 8 to 32-bit integers and 32/64-bit floats: no 64-bit integers."""
    return holds_all_but_float16(dtype) and not (dtype.kind in "iu" and dtype.itemsize == 8)


def _spacing_mm(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """(z, y, x) spacing in mm from ImageJ or OME metadata, or None when the file does not say."""
    if tif.is_ome and tif.ome_metadata:
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels")
        if pixels is not None and pixels.get("PhysicalSizeX"):
            out = []
            for ax in "ZYX":
                size = pixels.get(f"PhysicalSize{ax}") or pixels.get("PhysicalSizeX")
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
                out.append(float(size) * MM_PER_UNIT.get(unit, 1.0))
            return tuple(out)  # type: ignore[return-value]
    meta = tif.imagej_metadata
    if tif.is_imagej and meta is not None:
        unit = str(meta.get("unit", "")).replace("\\u00B5", "µ")
        if unit not in MM_PER_UNIT:
            return None
        page = tif.pages.first
        xres, yres = (page.tags.get(t) for t in ("XResolution", "YResolution"))
        if xres is None or yres is None:
            return None
        sx = xres.value[1] / xres.value[0] * MM_PER_UNIT[unit]
        sy = yres.value[1] / yres.value[0] * MM_PER_UNIT[unit]
        sz = float(meta["spacing"]) * MM_PER_UNIT[unit] if "spacing" in meta else sx
        return (sz, sy, sx)
    return None


def _open_tiff_file(path: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
        raise InputError(path, f"not a readable TIFF file ({exc})") from exc


def _check_complete(path: Path, tif: tifffile.TiffFile, shape: tuple[int, ...]) -> None:
    """Raise InputError where the file's own metadata promises more images than it holds (truncation)."""
    if tif.is_shaped and tif.shaped_metadata:
        declared = tuple(tif.shaped_metadata[0].get("shape", shape))
        if declared != tuple(shape):
            raise InputError(
                path, f"truncated or corrupt TIFF: metadata says shape {declared}, found {shape}"
            )
    if tif.is_imagej and tif.imagej_metadata:
        images = int(tif.imagej_metadata.get("images", 1))
        if images != int(np.prod(shape[:-2])):
            raise InputError(path, f"truncated or corrupt TIFF: metadata says {images} images, found {shape}")


def open_tiff(path: Path) -> Volume:
    """Open a multi-page TIFF lazily: rows read straight from the file when uncompressed and contiguous,
    else page by page through tifffile."""
    tif = _open_tiff_file(path)
    try:
        series = tif.series[0]
        shape, dtype = series.shape, series.dtype
        spacing = _spacing_mm(tif)
        _check_complete(path, tif, shape)
        require_volume(path, shape, dtype)
    except Exception as exc:
        tif.close()
        if isinstance(exc, InputError):
            raise
        raise InputError(path, f"not a readable TIFF file ({exc})") from exc  # tifffile raises many types
    if series.dataoffset is not None:
        tif.close()
        end = series.dataoffset + int(np.prod(shape)) * dtype.itemsize
        if end > path.stat().st_size:
            raise InputError(path, f"truncated TIFF: {path.stat().st_size} bytes, the data end at byte {end}")
        if dtype.byteorder not in "=|":  # big-endian TIFF: let numpy swap through a memory map
            mm = np.memmap(path, dtype=dtype, mode="r", offset=series.dataoffset, shape=shape)
            array = LazyArray(path, shape, dtype.newbyteorder("="), lambda key: np.array(mm[key]))
        else:
            array = LazyArray(path, shape, dtype, raw_reader(path, series.dataoffset, shape, dtype))
        return Volume(array, spacing=spacing or (1.0, 1.0, 1.0))

    def read(key):
        zk, yk, xk = key
        pages = [zk] if isinstance(zk, int) else list(range(*zk.indices(shape[0])))
        if not pages:
            return np.empty((0, *shape[1:]), dtype)[:, yk, xk]
        data = tif.asarray(key=pages, series=0).reshape(len(pages), *shape[1:])[:, yk, xk]
        return data[0] if isinstance(zk, int) else data

    return Volume(LazyArray(path, shape, dtype, read), spacing=spacing or (1.0, 1.0, 1.0))


def _natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", path.name)]


def slice_files(folder: Path) -> list[Path]:
    """The TIFF files of a folder in natural order (``s2.tif`` before ``s10.tif``)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=_natural_key)


def open_tiff_slices(folder: Path) -> Volume:
    """Open a folder of 2D TIFF slices (one per z, natural sort order) lazily; every slice is checked."""
    files = slice_files(folder)
    if not files:
        raise InputError(folder, "the folder holds no TIFF slices")
    shapes = {}
    for f in files:
        with _open_tiff_file(f) as tif:
            if not tif.series:
                raise InputError(f, "not a readable TIFF file (it holds no image)")
            series = tif.series[0]
            shapes.setdefault((series.shape, series.dtype.str), f)
            if f is files[0]:
                spacing = _spacing_mm(tif)
    if len(shapes) > 1:
        (s0, d0), (s1, d1) = list(shapes)[:2]
        first, other = (
            f"{files[0].name} is {s0} {np.dtype(d0)}",
            f"{shapes[(s1, d1)].name} is {s1} {np.dtype(d1)}",
        )
        raise InputError(folder, f"slices differ in shape or dtype: {first}, {other}")
    (shape2d, dtype) = next(iter(shapes))
    if len(shape2d) != 2:
        raise InputError(files[0], f"not a 2D slice: shape {shape2d}")
    shape = (len(files), *shape2d)

    def read_slice(f: Path) -> np.ndarray:
        try:
            image = tifffile.imread(f)
        except Exception as exc:  # tifffile raises many types for a slice damaged after the folder was opened
            raise InputError(f, f"not a readable TIFF file ({exc})") from exc
        if image.shape != shape2d:
            raise InputError(f, f"slices differ in shape: this one is {image.shape}, not {shape2d}")
        return image

    def read(key):
        zk, yk, xk = key
        if isinstance(zk, int):
            return read_slice(files[zk])[yk, xk]
        chosen = files[zk]
        out = np.empty((len(chosen), *np.empty(shape2d, np.uint8)[yk, xk].shape), dtype)
        for i, f in enumerate(chosen):
            out[i] = read_slice(f)[yk, xk]
        return out

    return Volume(LazyArray(folder, shape, dtype, read), spacing=spacing or (1.0, 1.0, 1.0))


def _tiff_options(volume: Volume) -> dict:
    """tifffile keywords holding a volume's spacing: ImageJ where the dtype allows, else OME."""
    sz, sy, sx = volume.spacing
    if volume.array.dtype in _IMAGEJ_DTYPES and volume.array.nbytes < _BIGTIFF_FROM:
        return {
            "imagej": True,
            "photometric": "minisblack",
            "resolution": (1 / sx, 1 / sy),
            "metadata": {"axes": "ZYX", "spacing": sz, "unit": "mm"},
        }
    return {
        "ome": True,
        "photometric": "minisblack",
        "bigtiff": volume.array.nbytes >= _BIGTIFF_FROM,
        "metadata": {
            "axes": "ZYX",
            **{f"PhysicalSize{a}": s for a, s in zip("ZYX", volume.spacing, strict=True)},
            **{f"PhysicalSize{a}Unit": "mm" for a in "ZYX"},
        },
    }


class TiffWriter(RawWriter):
    """Multi-page TIFF writer: tifffile lays out an empty contiguous file, slabs are then written in place."""

    _holds = staticmethod(_holds)

    def _header(self) -> int:
        tifffile.imwrite(self.target, shape=self.shape, dtype=self.dtype, **_tiff_options(self.geometry))
        with tifffile.TiffFile(self.target) as tif:
            return int(tif.series[0].dataoffset)


class TiffSlicesWriter(VolumeWriter):
    """Folder-of-slices writer: one 2D TIFF per z (``slice_00000.tif``, ...), each holding the spacing."""

    _holds = staticmethod(_holds)

    resumable = True

    def _create(self) -> dict:
        self.target.mkdir()
        return {}

    def _reopen(self, state: dict) -> None:
        pass

    def _write(self, z0: int, slab: np.ndarray) -> None:
        opts = _tiff_options(self.geometry)
        opts["metadata"] = {k: v for k, v in opts["metadata"].items() if k != "axes"}
        opts.pop("bigtiff", None)
        for i, image in enumerate(slab):
            tifffile.imwrite(self._slice(z0 + i), image, **opts)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        return np.stack([tifffile.imread(self._slice(z)) for z in range(z0, z1)])

    def _slice(self, z: int) -> Path:
        return self.target / f"slice_{z:0{max(5, len(str(self.shape[0] - 1)))}d}.tif"
