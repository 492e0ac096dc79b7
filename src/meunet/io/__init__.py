"""Volume I/O: read, lazily open and stream-write 3D images in the formats microCT users have.

Arrays are (z, y, x); spacing and origin are (z, y, x) in millimetres; ``direction`` columns are the world
(LPS, listed z, y, x) directions of the array axes (see :mod:`meunet.io._volume`). Formats, chosen by
suffix: NIfTI ``.nii``/``.nii.gz``, TIFF ``.tif``/``.tiff`` (multi-page) or a folder of TIFF slices (a path
without suffix when writing), Zarr / OME-Zarr ``.zarr``, NRRD ``.nrrd``, MetaImage ``.mha``/``.mhd``,
NumPy ``.npy``, and (reading only) a folder holding one DICOM series. Every user-caused problem raises
:class:`meunet.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike
from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io._pyramid import PYRAMID_LEVELS, add_label_pyramid, downsample_mode
from meunet.io._safe import (
    atomic_output,
    check_new_output,
    check_outputs,
    output_lock,
    require_suffix,
    user_error,
    write_json,
)
from meunet.io._volume import LazyArray, Volume, check_geometry, fits_float32, require_finite
from meunet.io._writer import VolumeWriter, WriteBehind, partial_run

__all__ = [
    "PYRAMID_LEVELS",
    "LazyArray",
    "Volume",
    "VolumeWriter",
    "WriteBehind",
    "add_label_pyramid",
    "atomic_output",
    "check_new_output",
    "check_outputs",
    "create_writer",
    "downsample_mode",
    "iter_slabs",
    "ome_levels",
    "open_volume",
    "output_lock",
    "partial_run",
    "read_volume",
    "require_finite",
    "require_suffix",
    "user_error",
    "value_range",
    "volume_format",
    "volume_pairs",
    "write_json",
    "write_volume",
]

_SUFFIX_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti-gz",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".zarr": "zarr",
    ".nrrd": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".npy": "npy",
}
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
SLAB_BYTES = 64 << 20


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def volume_format(path: str | PathLike[str]) -> str:
    """Format of an existing volume: ``nifti``, ``nifti-gz``, ``tiff``, ``tiff-slices``, ``zarr``,
    ``ome-zarr``, ``nrrd``, ``metaimage``, ``npy`` or ``dicom``. Raises InputError when it cannot tell."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    suffix = _suffix(path)
    if suffix == ".zarr" and not path.is_dir():
        raise InputError(path, "not a Zarr store: a file, not a folder")
    if path.is_dir() and (suffix == ".zarr" or any((path / m).exists() for m in _ZARR_MARKERS)):
        import zarr

        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:  # zarr raises many types for a damaged store
            raise InputError(path, f"not a readable Zarr store ({exc})") from exc
        return "ome-zarr" if isinstance(node, zarr.Group) else "zarr"
    if path.is_dir():
        from meunet.io._itk import dicom_series
        from meunet.io._tiff import slice_files

        if slice_files(path):
            return "tiff-slices"
        if dicom_series(path):
            return "dicom"
        raise InputError(path, "the folder holds no TIFF slices, DICOM series or Zarr store")
    if suffix not in _SUFFIX_FORMATS:
        raise InputError(path, f"unknown volume format {suffix or '(no suffix)'!r}; " + _KNOWN)
    return _SUFFIX_FORMATS[suffix]


_KNOWN = "use .nii, .nii.gz, .tif, .tiff, .zarr, .nrrd, .mha, .mhd, .npy, or a folder of TIFF or DICOM slices"


def open_volume(path: str | PathLike[str], spacing: tuple[float, float, float] | None = None) -> Volume:
    """Open a volume lazily where the format allows it (all but NRRD and DICOM, which are read whole).

    Args:
        path: file or folder; the format comes from the suffix (see :func:`volume_format`).
        spacing: (z, y, x) voxel size in mm that replaces the file's own (for TIFFs without metadata).

    Returns:
        a :class:`Volume` whose ``array`` (Z, Y, X), in the file's dtype, reads voxels only when sliced.
    """
    path = Path(path)
    fmt = volume_format(path)
    if fmt in ("nifti", "nifti-gz"):
        from meunet.io._nifti import open_nifti as opener
    elif fmt == "tiff":
        from meunet.io._tiff import open_tiff as opener
    elif fmt == "tiff-slices":
        from meunet.io._tiff import open_tiff_slices as opener
    elif fmt in ("zarr", "ome-zarr"):
        from meunet.io._zarr import open_zarr as opener
    elif fmt == "nrrd":
        from meunet.io._itk import read_itk as opener
    elif fmt == "metaimage":
        from meunet.io._itk import open_metaimage as opener
    elif fmt == "dicom":
        from meunet.io._itk import read_dicom as opener
    else:
        from meunet.io._npy import open_npy as opener
    volume = opener(path)
    if spacing is not None:
        volume.spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
        if len(volume.spacing) != 3 or not fits_float32(volume.spacing, positive=True):
            raise InputError(
                path, f"spacing needs three positive finite values (z, y, x) that fit float32, got {spacing}"
            )
    check_geometry(path, volume)
    return volume


def read_volume(path: str | PathLike[str], spacing: tuple[float, float, float] | None = None) -> Volume:
    """Read a whole volume into memory: like :func:`open_volume`, with ``array`` a numpy (Z, Y, X) array.

    >>> volume = read_volume(image_path)
    >>> volume.array.shape, volume.array.dtype.name, volume.spacing
    ((40, 20, 24), 'uint8', (0.5, 0.25, 0.25))
    """
    volume = open_volume(path, spacing)
    if not isinstance(volume.array, np.ndarray):
        volume.array = volume.array[...]
    return volume


def create_writer(
    path: str | PathLike[str],
    shape: tuple[int, int, int],
    dtype,
    like: Volume | None = None,
    chunks: tuple[int, int, int] | None = None,
    force: bool = False,
    resume: bool = False,
    channels: int | None = None,
    run: dict | None = None,
) -> VolumeWriter:
    """A streaming writer for a (Z, Y, X) volume: ``with create_writer(...) as w: w.write(z0, slab)``.

    Slabs (dz, Y, X) may come in any order. The output is built in ``.<name>.partial/`` beside ``path`` and
    moved into place when the ``with`` block ends cleanly; on an exception it is removed (kept when
    ``resume``). Memory stays at one slab, except for NRRD and MetaImage, which hold the whole volume.

    Args:
        path: output; the format comes from the suffix; a path without suffix is a folder of TIFF slices.
        shape: (Z, Y, X) of the whole output.
        dtype: output dtype (bool is written as uint8); each slab must cast to it safely.
        like: volume whose spacing, origin and direction the output takes (default: 1 mm, identity).
        chunks: (z, y, x) chunk shape for Zarr (default 64, 128, 128); ignored by other formats.
        force: overwrite an existing output.
        resume: continue a partial output left by an earlier run (Zarr, NIfTI, npy, TIFF, slice folder);
            ``writer.is_written(z0, z1)`` then tells which slabs are already there.
        channels: write C per-voxel maps (class probabilities, stage-1 output) instead: one Zarr array
            (C, Z, Y, X) with chunks (C, 64, 64, 64) and ``like``'s geometry in its attributes
            (:class:`meunet.io._zarr.ChannelsWriter`); slabs are then (C, dz, Y, X).
        run: JSON-able description of what makes the output (e.g. model digest, input and settings),
            kept with the partial output: resuming one made by another ``run`` is refused. A resumed
            writer also reads back every slab the earlier run logged and keeps only those whose CRC-32
            matches the log (the others count as not written).

    Raises:
        InputError: unknown suffix (not ``.zarr`` with ``channels``), or the output exists and ``force``
            is false.
    """
    path = Path(path)
    suffix = _suffix(path)
    check_new_output(path, force)
    if not path.parent.is_dir():
        raise InputError(path.parent, "the output folder does not exist")
    if suffix and suffix not in _SUFFIX_FORMATS:
        raise InputError(path, f"unknown volume format {suffix!r}; " + _KNOWN)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(path, f"cannot write a volume of shape {tuple(shape)}: need (Z, Y, X) >= 1")
    if chunks is not None and (len(chunks) != 3 or min(chunks) < 1):
        raise InputError(path, f"chunks need three positive values (z, y, x), got {chunks}")
    dtype = np.dtype(np.uint8 if np.dtype(dtype) == bool else dtype).newbyteorder("=")
    geo = like or Volume(np.empty((0, 0, 0)))
    geometry = Volume(
        np.broadcast_to(np.zeros((), dtype), tuple(shape)), geo.spacing, geo.origin, geo.direction
    )
    fmt = _SUFFIX_FORMATS.get(suffix, "tiff-slices")
    if channels is not None:
        from meunet.io._zarr import ChannelsWriter

        if fmt != "zarr":
            raise InputError(path, "per-channel maps are written as Zarr: give a name ending in .zarr")
        writer = ChannelsWriter(path, geometry, channels, resume, force)
        writer.run = run
        return writer
    if fmt in ("nifti", "nifti-gz"):
        from meunet.io._nifti import NiftiWriter as Writer
    elif fmt == "tiff":
        from meunet.io._tiff import TiffWriter as Writer
    elif fmt == "tiff-slices":
        from meunet.io._tiff import TiffSlicesWriter as Writer
    elif fmt == "zarr":
        from meunet.io._zarr import ZarrWriter as Writer
    elif fmt in ("nrrd", "metaimage"):
        from meunet.io._itk import ItkWriter as Writer
    else:
        from meunet.io._npy import NpyWriter as Writer
    writer = Writer(path, geometry, None if chunks is None else tuple(int(c) for c in chunks), resume, force)
    writer.run = run
    return writer


def ome_levels(path: str | PathLike[str], mode: str = "r") -> list:
    """The zarr arrays of every level of an OME-Zarr image's first multiscale image, level 0 first."""
    import zarr

    from meunet.io._zarr import _multiscale

    group = zarr.open_group(path, mode=mode)
    return [group[d["path"]] for d in _multiscale(dict(group.attrs))["datasets"]]


def volume_pairs(input: str | PathLike[str], output: str | PathLike[str]) -> list[tuple[Path, Path]]:
    """The (input, output) pairs of a prediction: one pair for a volume, or for a folder that holds
    volumes, each volume ``NAME.ext`` (or folder volume) with output ``OUTPUT/NAME.zarr``.

    A folder is one volume when it is a Zarr store or a folder of TIFF or DICOM slices; otherwise its
    entries that are volumes are taken (hidden entries and other files are ignored) and ``output`` is a
    folder.

    Raises:
        InputError: no such input, or a folder without volumes.
    """
    input, output = Path(input), Path(output)
    if not input.is_dir() or _is_volume(input):
        return [(input, output)]
    found = [p for p in sorted(input.iterdir()) if not p.name.startswith(".") and _is_volume(p)]
    if not found:
        raise InputError(input, "the folder holds no volumes")
    if output.exists() and not output.is_dir():
        raise InputError(output, "the output for a folder of volumes must be a folder")
    return [(p, output / f"{_stem(p)}.zarr") for p in found]


def _is_volume(path: Path) -> bool:
    try:
        volume_format(path)
    except InputError:
        return False
    return True


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def _slab_depth(shape: tuple[int, ...], dtype, chunk_z: int = 1) -> int:
    """Slices per slab so that one slab holds about 64 MiB, rounded to a multiple of ``chunk_z``."""
    per_slice = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    depth = max(1, SLAB_BYTES // max(per_slice, 1))
    return max(chunk_z, depth // chunk_z * chunk_z)


def iter_slabs(array, depth: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(z0, array[z0 : z0 + depth])`` over a (Z, Y, X) array or lazy array, as numpy slabs.

    ``depth`` defaults to about 64 MiB of voxels per slab.
    """
    depth = depth or _slab_depth(array.shape, array.dtype)
    for z0 in range(0, array.shape[0], depth):
        yield z0, np.asarray(array[z0 : z0 + depth])


def value_range(array) -> tuple[float | None, float | None, int]:
    """(min, max, non-finite count) of a (Z, Y, X) array or lazy array, computed slab by slab.

    The range is over the finite voxels (None, None where there are none); NaN and infinite voxels are
    counted, not ranged. Returns Python ints for integer dtypes, floats otherwise.

    >>> value_range(np.array([[[1.0, np.nan], [np.inf, 3.0]]], np.float32))
    (1.0, 3.0, 2)
    """
    low, high, non_finite = [], [], 0
    for _, slab in iter_slabs(array):
        if slab.dtype.kind == "f":
            finite = np.isfinite(slab)
            non_finite += int(finite.size - np.count_nonzero(finite))
            slab = slab[finite]
        if slab.size:
            low.append(slab.min())
            high.append(slab.max())
    if not low:
        return None, None, non_finite
    return np.min(low).item(), np.max(high).item(), non_finite


def write_volume(
    path: str | PathLike[str],
    volume: Volume,
    chunks: tuple[int, int, int] | None = None,
    force: bool = False,
    progress: bool = False,
) -> None:
    """Write a volume (its array may be lazy: it is streamed slab by slab) with its geometry.

    Args:
        path: output path; the format comes from the suffix (see :func:`create_writer`).
        volume: the (Z, Y, X) volume to write, dtype kept.
        chunks: (z, y, x) chunk shape for Zarr outputs.
        force: overwrite an existing output.
        progress: show a progress bar (tqdm, on a terminal only).
    """
    from tqdm import tqdm

    array = volume.array
    with create_writer(path, array.shape, array.dtype, like=volume, chunks=chunks, force=force) as writer:
        depth = _slab_depth(array.shape, array.dtype, writer.z_chunk)
        bar = tqdm(
            total=array.shape[0], unit="slice", desc=Path(path).name, disable=None if progress else True
        )
        with bar:
            for z0, slab in iter_slabs(array, depth):
                writer.write(z0, slab)
                bar.update(len(slab))
