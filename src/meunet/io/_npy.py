"""NumPy ``.npy``: slab reads with ``pread``, raw streaming writes. No geometry in the format (spacing 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io._volume import LazyArray, Volume, raw_reader, require_volume
from meunet.io._writer import RawWriter


def open_npy(path: Path) -> Volume:
    """Open a ``.npy`` file lazily; slicing reads only the selected rows from the file."""
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy file ({exc})") from exc
    require_volume(path, mm.shape, mm.dtype)
    if mm.dtype.byteorder not in "=|" or not mm.flags.c_contiguous:  # big-endian or Fortran order: memmap
        return Volume(LazyArray(path, mm.shape, mm.dtype.newbyteorder("="), lambda key: np.array(mm[key])))
    return Volume(LazyArray(path, mm.shape, mm.dtype, raw_reader(path, mm.offset, mm.shape, mm.dtype)))


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
