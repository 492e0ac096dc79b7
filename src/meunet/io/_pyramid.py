"""OME-Zarr labels: a one-level OME-Zarr image of labels (as :func:`meunet.io.write_volume` writes it) made
an NGFF labels image with a multiscale pyramid, which napari (napari-ome-zarr) and neuroglancer open as a
segmentation."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

PYRAMID_LEVELS = 3


def downsample_mode(labels: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2 x 2 x 2 cell (ties go to the smaller label).

    Args:
        labels: uint8 (Z, Y, X); an odd trailing cell holds the voxels that exist.

    Returns:
        uint8 (ceil(Z / 2), ceil(Y / 2), ceil(X / 2)).
    """
    padded = np.pad(
        labels, [(0, n % 2) for n in labels.shape], mode="edge"
    )  # doubles each vote of a half cell
    z, y, x = (n // 2 for n in padded.shape)
    cells = padded.reshape(z, 2, y, 2, x, 2)
    best = np.zeros((z, y, x), labels.dtype)
    best_count = np.zeros((z, y, x), np.uint8)
    for value in np.unique(labels):
        count = (cells == value).sum(axis=(1, 3, 5), dtype=np.uint8)
        better = count > best_count
        best[better] = value
        best_count[better] = count[better]
    return best


def add_label_pyramid(
    path: str | os.PathLike[str], levels: int = PYRAMID_LEVELS, classes: Sequence[str] = ()
) -> None:
    """Turn an OME-Zarr image with one level (as :func:`meunet.io.write_volume` writes) into a labels image
    with a multiscale pyramid.

    Writes levels ``1 .. levels`` (each from the one before with :func:`downsample_mode`, chunked like level
    0, computed with Dask: on the active ``dask.distributed`` client if there is one), their scale and
    translation (the centre of each 2^k cell), and the NGFF ``image-label`` metadata with one colour and
    name per class, so that napari (napari-ome-zarr) and neuroglancer open it as a segmentation.

    Args:
        path: the OME-Zarr group (level ``0``: uint8 (Z, Y, X) labels).
        levels: number of downsampled levels.
        classes: class names, index = label value (label 0 is drawn transparent).
    """
    import dask.array as da
    import zarr
    from matplotlib import colormaps

    group = zarr.open_group(path, mode="r+")
    ome = dict(group.attrs["ome"])
    multiscale = ome["multiscales"][0]
    base = multiscale["datasets"][0]
    transforms = {t["type"]: t[t["type"]] for t in base["coordinateTransformations"]}
    spacing = np.asarray(transforms.get("scale", [1.0, 1.0, 1.0]), float)
    origin = np.asarray(transforms.get("translation", [0.0, 0.0, 0.0]), float)
    datasets = [base]
    level0 = group[base["path"]]
    for k in range(1, levels + 1):
        source = group[str(k - 1) if k > 1 else base["path"]]
        shape = tuple(-(-n // 2) for n in source.shape)
        chunks = tuple(min(c, n) for c, n in zip(level0.chunks, shape, strict=True))
        target = group.create_array(
            str(k),
            shape=shape,
            chunks=chunks,
            dtype=level0.dtype,
            dimension_names=("z", "y", "x"),
            overwrite=True,
            config={"write_empty_chunks": True},
        )
        pairs = da.from_zarr(source, chunks=tuple(2 * c for c in chunks))
        down = pairs.map_blocks(
            downsample_mode,
            chunks=tuple(tuple(-(-c // 2) for c in axis) for axis in pairs.chunks),
            dtype=level0.dtype,
        )
        da.store(down, target, lock=False)
        factor = 2.0**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": (spacing * factor).tolist()},
                    {"type": "translation", "translation": (origin + spacing * (factor - 1) / 2).tolist()},
                ],
            }
        )
    multiscale["datasets"] = datasets
    multiscale["type"] = "mode"
    palette = colormaps["tab10"]
    ome["image-label"] = {
        "version": ome.get("version", "0.5"),
        "colors": [
            {"label-value": i, "rgba": [0, 0, 0, 0] if i == 0 else [int(255 * v) for v in palette(i - 1)]}
            for i in range(max(len(classes), 1))
        ],
        "properties": [{"label-value": i, "name": name} for i, name in enumerate(classes)],
    }
    group.attrs["ome"] = ome
