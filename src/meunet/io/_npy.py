"""NumPy ``.npy``: memory-mapped reads, raw streaming writes. The format holds no geometry (spacing 1 mm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io._volume import LazyArray, Volume, require_3d
from meunet.io._writer import RawWriter


def open_npy(path: Path) -> Volume:
    """Open a ``.npy`` file lazily (memory-mapped); slicing copies only the selected voxels."""
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy file ({exc})") from exc
    require_3d(path, mm.shape)
    if mm.dtype.hasobject or mm.dtype.fields is not None:
        raise InputError(path, f"unsupported .npy dtype {mm.dtype}")
    return Volume(LazyArray(path, mm.shape, mm.dtype, lambda key: np.array(mm[key])))


class NpyWriter(RawWriter):
    def _header(self) -> int:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        with open(self._raw_path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            return f.tell()
