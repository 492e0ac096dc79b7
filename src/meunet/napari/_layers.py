"""Layer keyword arguments shared by the reader, the sample data and the widgets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meunet.io import LazyArray

UNKNOWN_CLASSES = 10  # label values named and coloured when a file says nothing about its classes


def labels_kwargs(class_names: Sequence[str]) -> dict:
    """``add_labels`` arguments: meunet's overlay colours (:func:`meunet.report.label_colormap`; the
    background stays transparent, as napari shows it) and a ``class`` feature, shown in the status bar."""
    from napari.utils.colormaps import DirectLabelColormap

    from meunet.report import label_colormap

    cmap = label_colormap(len(class_names))
    colors = {None: (0.5, 0.5, 0.5, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
    colors.update({c: cmap(c) for c in range(1, len(class_names))})
    features = {"index": np.arange(len(class_names)), "class": list(class_names)}
    return {"colormap": DirectLabelColormap(color_dict=colors), "features": features}


def default_class_names(n: int = UNKNOWN_CLASSES) -> list[str]:
    """``background``, then ``label 1`` ... ``label n-1``."""
    return ["background", *(f"label {c}" for c in range(1, n))]


def layer_class_names(layer) -> list[str]:
    """A Labels layer's ``class`` feature by label value, or :func:`default_class_names`."""
    features = layer.features
    if "class" not in features or "index" not in features:
        return default_class_names()
    names = dict(zip(features["index"], features["class"], strict=True))
    return [str(names.get(c, f"label {c}")) for c in range(int(max(names)) + 1)]


def level0(layer) -> LazyArray:
    """A layer's full-resolution (Z, Y, X) data as a lazy array that slices to numpy (dask, zarr ...)."""
    from meunet.errors import InputError

    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim != 3:
        raise InputError(layer.name, f"needs a 3D (z, y, x) layer, this one has {data.ndim} dimensions")
    return LazyArray(layer.name, data.shape, data.dtype, lambda key: np.asarray(data[key]))


def geometry(layer) -> dict:
    """The layer's scale and translate as :class:`meunet.io.Volume` spacing and origin (z, y, x, mm)."""
    return {"spacing": tuple(layer.scale[-3:]), "origin": tuple(layer.translate[-3:])}
