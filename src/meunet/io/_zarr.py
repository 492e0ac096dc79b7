"""Zarr (v2 or v3) arrays and OME-Zarr (NGFF 0.4 / 0.5) images, through zarr-python.

Reading takes level 0 of the first multiscale image, with its ``scale`` and ``translation`` as spacing and
origin (converted to mm from the axes' units); leading non-spatial axes must have size 1. Writing makes an
OME-Zarr 0.5 image (Zarr v3): a group with one chunked level ``0``, axes z, y, x in millimetres, and the
direction matrix (which NGFF cannot hold) under the group attribute ``meunet``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from meunet.errors import InputError
from meunet.io._volume import MM_PER_UNIT, LazyArray, Volume, require_volume
from meunet.io._writer import VolumeWriter

DEFAULT_CHUNKS = (64, 128, 128)  # 1 MiB of uint8: few enough chunks for fast writes, small for viewers


def _multiscale(attrs: dict) -> dict | None:
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    return multiscales[0] if multiscales else None


def _scale_translation(transforms: list[dict]) -> tuple[np.ndarray | None, np.ndarray | None]:
    scale = next((np.asarray(t["scale"], float) for t in transforms if t["type"] == "scale"), None)
    shift = next(
        (np.asarray(t["translation"], float) for t in transforms if t["type"] == "translation"), None
    )
    return scale, shift


def open_zarr(path: Path) -> Volume:
    """Open a Zarr array, or level 0 of an OME-Zarr image, lazily (the zarr array reads chunk by chunk)."""
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises many types for a damaged store
        raise InputError(path, f"not a readable Zarr store ({exc})") from exc
    spacing, origin, direction = np.ones(3), np.zeros(3), np.eye(3)
    if isinstance(node, zarr.Group):
        try:
            array, spacing, origin, direction = _ome_level0(path, node)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise InputError(path, f"malformed OME-Zarr multiscales metadata ({what})"[:300]) from None
    else:
        array = node
    if array.ndim > 3 and all(n == 1 for n in array.shape[:-3]):
        lead = (0,) * (array.ndim - 3)
        inner = array
        array = LazyArray(path, inner.shape[-3:], inner.dtype, lambda key: inner[lead + key])
    require_volume(path, array.shape, array.dtype)
    return Volume(array, spacing=tuple(spacing), origin=tuple(origin), direction=direction)


def _ome_attrs(volume: Volume, name: str) -> dict:
    return {
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "name": name,
                    "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"],
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [
                                {"type": "scale", "scale": list(volume.spacing)},
                                {"type": "translation", "translation": list(volume.origin)},
                            ],
                        }
                    ],
                }
            ],
        },
        "meunet": {"direction": volume.direction.tolist()},
    }


class ZarrWriter(VolumeWriter):
    """OME-Zarr writer: chunked level ``0`` (default chunks 64 x 128 x 128, zstd), slabs in any order.

    ``writer.array`` is the zarr array being filled; other processes (Dask workers) may write chunks to it
    directly, in which case :meth:`is_written` does not know about them.
    """

    resumable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._chunks = tuple(
            min(c, n) for c, n in zip(self.chunks or DEFAULT_CHUNKS, self.shape, strict=True)
        )
        self.z_chunk = self._chunks[0]

    def _create(self) -> dict:
        group = zarr.open_group(self.target, mode="w", zarr_format=3)
        group.attrs.update(_ome_attrs(self.geometry, self.path.name.removesuffix(".zarr")))
        self.array = group.create_array(
            "0",
            shape=self.shape,
            chunks=self._chunks,
            dtype=self.dtype,
            dimension_names=("z", "y", "x"),
            config={"write_empty_chunks": True},
        )
        return {}

    def _reopen(self, state: dict) -> None:
        self.array = zarr.open_array(self.target / "0", mode="r+")

    def _write(self, z0: int, slab: np.ndarray) -> None:
        self.array[z0 : z0 + slab.shape[0]] = slab

    def _read(self, z0: int, z1: int) -> np.ndarray:
        return self.array[z0:z1]


class ChannelsWriter(VolumeWriter):
    """C per-voxel maps (class probabilities, a cascade's stage-1 output) as one Zarr v3 array (C, Z, Y, X),
    chunks (C, 64, 64, 64), dimension names c, z, y, x; the spacing, origin and direction of the volume they
    belong to go to the array's attribute ``meunet``. Slabs are (C, dz, Y, X)."""

    resumable = True

    def __init__(self, path: Path, geometry: Volume, channels: int, resume: bool, force: bool = False):
        super().__init__(path, geometry, tuple(min(64, n) for n in geometry.array.shape), resume, force)
        self.channels = channels
        self.z_chunk = self.chunks[0]

    def _create(self) -> dict:
        g = self.geometry
        self.array = zarr.create_array(
            self.target,
            shape=(self.channels, *self.shape),
            chunks=(self.channels, *self.chunks),
            dtype=self.dtype,
            zarr_format=3,
            dimension_names=("c", "z", "y", "x"),
            attributes={
                "meunet": {
                    "spacing": list(g.spacing),
                    "origin": list(g.origin),
                    "direction": g.direction.tolist(),
                }
            },
        )
        return {"channels": self.channels}

    def _reopen(self, state: dict) -> None:
        if state.get("channels") != self.channels:
            raise InputError(
                self.path, f"the partial output has {state.get('channels')} channels, not {self.channels}"
            )
        self.array = zarr.open_array(self.target, mode="r+")

    def _write(self, z0: int, slab: np.ndarray) -> None:
        self.array[:, z0 : z0 + slab.shape[1]] = slab

    def _read(self, z0: int, z1: int) -> np.ndarray:
        return self.array[:, z0:z1]


def _ome_level0(path: Path, node: zarr.Group) -> tuple:
    """Level 0 of the OME-Zarr image ``node`` and its geometry: ``(array, spacing, origin, direction)``."""
    spacing, origin, direction = np.ones(3), np.zeros(3), np.eye(3)
    ms = _multiscale(dict(node.attrs))
    if ms is None:
        raise InputError(path, "Zarr group without OME multiscales metadata (open the array inside it)")
    level = ms["datasets"][0]
    array = node[level["path"]]
    scale, shift = _scale_translation(level.get("coordinateTransformations", []))
    outer_scale, outer_shift = _scale_translation(ms.get("coordinateTransformations", []))
    axes = ms["axes"]
    space = [i for i, a in enumerate(axes) if (a.get("type") if isinstance(a, dict) else None) == "space"]
    space = space[-3:] if len(space) >= 3 else [len(axes) - 3, len(axes) - 2, len(axes) - 1]
    units = [MM_PER_UNIT.get(axes[i].get("unit"), 1.0) if isinstance(axes[i], dict) else 1.0 for i in space]
    if scale is not None:
        spacing = scale[space] * (outer_scale[space] if outer_scale is not None else 1) * units
    if shift is not None:
        origin = shift[space] * (outer_scale[space] if outer_scale is not None else 1) * units
    if outer_shift is not None:
        origin = origin + outer_shift[space] * units
    meunet = node.attrs.get("meunet", {})
    if "direction" in meunet:
        direction = np.asarray(meunet["direction"], float)
    if not isinstance(array, zarr.Array):
        raise ValueError(f"level 0 ({level['path']!r}) is not an array")
    return array, spacing, origin, direction
