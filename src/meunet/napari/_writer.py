"""Writer: a Labels layer to any format meunet writes (suffix = format), with the layer's scale and
translate as spacing and origin."""

from __future__ import annotations

import numpy as np

from meunet.io import Volume, write_volume


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write ``data`` (level 0 if multiscale) as a uint8 label volume; napari's save dialog has asked
    before an existing file is replaced. Returns ``[path]``."""
    array = data[0] if meta.get("multiscale") else data
    volume = Volume(
        np.asarray(array).astype(np.uint8, copy=False),
        spacing=tuple(meta["scale"][-3:]),
        origin=tuple(meta["translate"][-3:]),
    )
    write_volume(path, volume, force=True)
    return [path]
