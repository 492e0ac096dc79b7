"""Reader: any volume meunet reads; Zarr lazily as dask arrays (every OME-Zarr pyramid level, as a
multiscale layer), the other lazy formats as dask arrays over meunet's slab reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io import open_volume, volume_format
from meunet.napari._layers import default_class_names, labels_kwargs

CHUNK_BYTES = 8 << 20  # z depth of a dask chunk over a slab-readable file: about this many bytes
LABEL_VALUES = 32  # an integer volume with at most this many values in its sampled slices is a label volume


def get_reader(path):
    """The reader for ``path`` if meunet can open it (one path, not a list), else None."""
    if not isinstance(path, str | Path):
        return None
    try:
        volume_format(path)
    except InputError:
        return None
    return read_layers


def read_layers(path) -> list[tuple]:
    """One layer ``(data, kwargs, "image" | "labels")``: scale = spacing (mm), translate = origin."""
    path = Path(path)
    volume = open_volume(path)
    levels = _ome_levels(path) if volume_format(path) == "ome-zarr" else [_lazy(volume.array)]
    kwargs = {
        "name": path.name.removesuffix(".gz").rsplit(".", 1)[0] if path.suffix else path.name,
        "scale": volume.spacing,
        "translate": volume.origin,
        "axis_labels": ("z", "y", "x"),
        "units": ("mm", "mm", "mm"),
        "multiscale": len(levels) > 1,
    }
    data = levels if len(levels) > 1 else levels[0]
    if not _is_labels(levels[0], path):
        return [(data, kwargs, "image")]
    return [(data, {**kwargs, **labels_kwargs(_class_names(path))}, "labels")]


def _lazy(array):
    """A dask array over a lazy (Z, Y, X) array; numpy arrays (formats read whole) stay as they are."""
    import dask.array as da

    if isinstance(array, np.ndarray):
        return array
    chunks = getattr(array, "chunks", None)
    if chunks is None:
        depth = max(1, CHUNK_BYTES // max(1, array.shape[1] * array.shape[2] * array.dtype.itemsize))
        chunks = (depth, -1, -1)
    return da.from_array(array, chunks=chunks, meta=np.empty((0, 0, 0), array.dtype))


def _ome_levels(path: Path) -> list:
    """Every level of the first OME-Zarr multiscale image, largest first, leading size-1 axes dropped."""
    from meunet.io import ome_levels

    levels = [_lazy(array) for array in ome_levels(path)]
    return [level[(0,) * (level.ndim - 3)] for level in levels]


def _is_labels(array, path: Path) -> bool:
    """An OME-Zarr label image, or an integer volume with few distinct values in three sampled slices."""
    if path.is_dir() and (path / "zarr.json").exists():
        import zarr

        attrs = dict(zarr.open(path, mode="r").attrs)
        if "image-label" in attrs.get("ome", attrs):
            return True
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        return False
    depth = array.shape[0]
    slices = [np.asarray(array[z]) for z in sorted({depth // 4, depth // 2, 3 * depth // 4})]
    return len(np.unique(np.concatenate([s.ravel() for s in slices]))) <= LABEL_VALUES


def _class_names(path: Path) -> list[str]:
    """Class names from a meunet data set's ``dataset.json`` beside the file, else generic names."""
    dataset = path.parent / "dataset.json"
    try:
        classes = json.loads(dataset.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        return default_class_names()
    return [str(c) for c in classes] if isinstance(classes, list) and classes else default_class_names()
