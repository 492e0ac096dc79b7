"""Streaming writers: slabs in, one file or store out, written under a temporary name and renamed at last.

Every writer works inside a sibling folder ``.<name>.partial/`` that holds the output under its final name
(plus, for MetaImage, its ``.raw`` data file) and a progress log. On a clean exit the output is moved into
place and the folder removed; on an exception the folder is removed, unless the writer was opened with
``resume=True``, in which case a later ``resume=True`` writer continues from it. A writer holds the lock
of :func:`meunet.io._safe.output_lock` on the final name from ``__enter__`` to ``__exit__``, so the folder
belongs to one run at a time: a second writer of the same output stops with one line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io._safe import check_new_output, output_lock, user_error
from meunet.io._volume import Volume

PROGRESS = "progress.jsonl"


def partial_folder(path: str | os.PathLike[str]) -> Path:
    """The folder ``.<name>.partial/`` beside ``path`` in which its writer builds it."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def partial_run(path: str | os.PathLike[str]) -> dict | None:
    """The ``run`` record (see :func:`meunet.io.create_writer`) of the partial output an interrupted run left
    for ``path``, or None where there is none or its log is unreadable (resuming then says why)."""
    log = partial_folder(path) / PROGRESS
    try:
        first = log.read_text().splitlines()[0]
        run = json.loads(first).get("run")
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def holds_all_but_float16(dtype: np.dtype) -> bool:
    """``_holds`` for formats without float16 (NIfTI, TIFF with ImageJ or OME metadata, ITK)."""
    return dtype.kind in "iuf" and dtype != np.float16


class VolumeWriter:
    """Base of the format writers: a context manager taking (dz, Y, X) slabs through :meth:`write`.

    Attributes:
        path: the final output path.
        shape: (Z, Y, X) of the whole output.
        dtype: voxel dtype of the output; slabs must cast to it safely.
        geometry: a voxel-free :class:`Volume` (broadcast array) holding shape, dtype, spacing, origin and
            direction of the output.
        z_chunk: chunk depth of the output (1 except for Zarr); slabs starting and ending on multiples of it
            write whole chunks, which is faster and keeps resuming safe.
    """

    resumable = False  # formats with random-access writes into a file that survives the process
    max_side: int | None = None  # the most voxels per axis the format's header can hold

    def __init__(
        self,
        path: Path,
        geometry: Volume,
        chunks: tuple[int, int, int] | None,
        resume: bool,
        force: bool = False,
    ):
        self.path = Path(path)
        self.force = force
        self.geometry = geometry
        self.shape: tuple[int, int, int] = tuple(int(n) for n in geometry.array.shape)  # type: ignore[assignment]
        self.dtype = np.dtype(geometry.array.dtype)
        self.chunks = chunks
        self.resume = resume
        if not self._holds(self.dtype):
            raise InputError(self.path, f"this format cannot hold {self.dtype} voxels: use .zarr or .npy")
        if self.max_side is not None and max(self.shape) > self.max_side:
            raise InputError(
                self.path,
                f"this format holds at most {self.max_side} voxels per axis, not {self.shape}: "
                "use .zarr or .tif",
            )
        if resume and not self.resumable:
            raise InputError(self.path, "resuming needs a Zarr, NIfTI, .npy, TIFF or slice-folder output")
        self.partial = partial_folder(self.path)
        self.target = self.partial / self.path.name
        self._done = np.zeros(self.shape[0], dtype=bool)
        self.run: dict | None = None  # what makes the output (model, input, settings): checked on resume
        self._log = None
        self._lock = ExitStack()
        self.z_chunk = 1  # slabs aligned to multiples of this depth write whole chunks (Zarr)
        self.channels: int | None = None  # C for writers of (C, Z, Y, X) maps: slabs are (C, dz, Y, X)

    # -- the part each format fills in -------------------------------------------------------------------
    @staticmethod
    def _holds(dtype: np.dtype) -> bool:
        """Whether the format can store voxels of this dtype."""
        return dtype.kind in "biuf"

    def _create(self) -> dict:
        """Create the empty output at ``self.target``; return what :meth:`_reopen` needs (JSON-able)."""
        raise NotImplementedError

    def _reopen(self, state: dict) -> None:
        """Open the output left at ``self.target`` by an earlier run, given :meth:`_create`'s state."""
        raise NotImplementedError

    def _write(self, z0: int, slab: np.ndarray) -> None:
        raise NotImplementedError

    def _read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 : z1`` as written (resumable formats): what resuming verifies against the log."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Complete the file at ``self.target`` (called once, after the last write, before renaming)."""

    def _release(self) -> None:
        """Close open handles (called on success and on failure)."""

    # -- common machinery ---------------------------------------------------------------------------------
    def __enter__(self) -> VolumeWriter:
        self._lock.enter_context(output_lock(self.path))
        try:
            check_new_output(self.path, self.force)  # again, now that no other run can create it
            return self._open_partial()
        except OSError as exc:
            self._lock.close()
            raise (user_error(self.path, exc) or exc) from None
        except BaseException:
            self._lock.close()
            raise

    def _open_partial(self) -> VolumeWriter:
        g = self.geometry
        header = {
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "chunks": self.chunks and list(self.chunks),
            "geometry": [list(g.spacing), list(g.origin), g.direction.tolist()],
            "run": self.run,
        }
        if self.resume and (self.partial / PROGRESS).is_file():
            lines = (self.partial / PROGRESS).read_text().splitlines()
            try:
                old = json.loads(lines[0])
                state = old.pop("state")
            except (ValueError, KeyError, AttributeError):
                raise InputError(self.path, f"unreadable resume log {self.partial / PROGRESS}") from None
            if old.pop("run", None) != json.loads(json.dumps(header.pop("run"))):
                raise InputError(
                    self.path,
                    "the partial output was made by another model, input or settings; run without --resume",
                )
            if old != header:
                raise InputError(
                    self.path,
                    f"the partial output of an earlier run differs in shape, dtype, chunks or geometry "
                    f"({old}); remove {self.partial} or run without resuming",
                )
            self._reopen(state)
            self._verify(lines[1:])
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir()
            try:
                state = self._create()
                (self.partial / PROGRESS).write_text(json.dumps({**header, "state": state}) + "\n")
            except BaseException:
                self._discard()
                raise
        self._log = open(self.partial / PROGRESS, "a")  # closed in __exit__
        return self

    def _verify(self, lines: list[str]) -> None:
        """Mark as written the logged slabs that read back with their logged CRC-32; the others (a torn
        log line, a chunk corrupted or cut short when the earlier run was killed) are written again."""
        for line in lines:
            try:
                z0, z1, crc = json.loads(line)
                if zlib.crc32(np.ascontiguousarray(self._read(z0, z1), self.dtype)) == crc:
                    self._done[z0:z1] = True
            except Exception:
                continue

    def write(self, z0: int, slab: np.ndarray) -> None:
        """Write ``slab`` (dz, Y, X), or (C, dz, Y, X) with :attr:`channels`, at slices ``z0 : z0 + dz`` of
        the output; any order, any depth."""
        slab = np.asarray(slab)
        lead = () if self.channels is None else (self.channels,)
        if (
            slab.ndim != 3 + len(lead)
            or slab.shape[: len(lead)] != lead
            or slab.shape[-2:] != self.shape[1:]
            or z0 < 0
            or z0 + slab.shape[-3] > self.shape[0]
        ):
            shape = (*lead, *self.shape)
            raise ValueError(f"slab of shape {slab.shape} at z0={z0} does not fit an output of shape {shape}")
        if not np.can_cast(slab.dtype, self.dtype, "safe"):
            raise TypeError(f"slab dtype {slab.dtype} does not cast safely to the output dtype {self.dtype}")
        z1 = z0 + slab.shape[-3]
        slab = np.ascontiguousarray(slab, dtype=self.dtype)
        try:
            self._write(z0, slab)
        except OSError as exc:
            raise (user_error(self.path, exc) or exc) from None
        self._done[z0:z1] = True
        self._log.write(f"[{z0}, {z1}, {zlib.crc32(slab)}]\n")
        self._log.flush()

    def is_written(self, z0: int, z1: int) -> bool:
        """Whether slices ``z0 : z1`` have all been written (in this run, or in the run being resumed)."""
        return bool(self._done[z0:z1].all())

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._log is not None:
            self._log.close()
        with self._lock:
            if exc_type is not None:
                self._discard()
                return
            try:
                self._finish()
                self._release()
                self._move_into_place()
            except OSError as exc:
                self._discard()
                raise (user_error(self.path, exc) or exc) from None
            except BaseException:
                self._discard()
                raise

    def _discard(self) -> None:
        """After a failure: close handles, and remove the partial output unless it is kept for resuming."""
        self._release()
        if not self.resume:
            shutil.rmtree(self.partial, ignore_errors=True)

    def _move_into_place(self) -> None:
        if self.path.exists() and (self.path.is_dir() or self.target.is_dir()):  # rename cannot replace these
            os.replace(self.path, self.partial / ".replaced")
        for entry in sorted(self.partial.iterdir(), key=lambda p: p == self.target):  # main file last
            if entry.name not in (PROGRESS, ".replaced"):
                os.replace(entry, self.path.parent / entry.name)
        shutil.rmtree(self.partial)


class RawWriter(VolumeWriter):
    """Writer for formats whose voxels are one C-order (z, y, x) block at a byte offset (npy, NIfTI, TIFF).

    Subclasses create the file with its header at ``self._raw_path`` in :meth:`_header` and return the data
    offset; voxels go straight to the file with ``pwrite``, so memory stays at one slab and slabs can come in
    any order.
    """

    resumable = True

    def _header(self) -> int:
        raise NotImplementedError

    @property
    def _raw_path(self) -> Path:
        return self.target

    def _create(self) -> dict:
        free, needed = shutil.disk_usage(self.partial).free, self.geometry.array.nbytes
        if needed > free:  # the file is sparse until written: say so before any work
            raise InputError(
                self.path,
                f"{os.strerror(errno.ENOSPC)}: the output needs {_mib(needed)}, its file system has "
                f"{_mib(free)} free",
            )
        offset = self._header()
        end = offset + self.geometry.array.nbytes
        if self._raw_path.stat().st_size < end:  # TIFF keeps IFDs after the data: never cut a file short
            os.truncate(self._raw_path, end)
        self._open(offset)
        return {"offset": offset}

    def _reopen(self, state: dict) -> None:
        self._open(state["offset"])

    def _open(self, offset: int) -> None:
        self._offset = offset
        self._fd = os.open(self._raw_path, os.O_RDWR)
        self._slice_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize

    def _write(self, z0: int, slab: np.ndarray) -> None:
        view = memoryview(slab).cast("B")
        at, done = self._offset + z0 * self._slice_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], at + done)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        size = (z1 - z0) * self._slice_bytes
        data = os.pread(self._fd, size, self._offset + z0 * self._slice_bytes)
        if len(data) != size:
            raise ValueError("short read")
        return np.frombuffer(data, self.dtype)

    def _release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


class WriteBehind:
    """Writes pieces to writers on one background thread while the caller computes the next piece, as
    nnU-Net's export workers do; at most one piece is in flight (its arrays must not be changed after
    :meth:`write`). A write's error is raised by the next :meth:`write` or on leaving the context; leaving on
    an exception waits for the write in flight, so the writers are never closed under it.

    >>> with WriteBehind([writer]) as behind:  # doctest: +SKIP
    ...     for z0, labels in slabs:
    ...         behind.write(z0, (labels,))
    """

    def __init__(self, writers) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writers = list(writers)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="meunet-writer")
        self._pending = None

    def write(self, z0: int, pieces: tuple[np.ndarray, ...]) -> None:
        """Write ``pieces[i]`` at ``z0`` to ``writers[i]``, after the piece before has been written."""
        self._wait()
        self._pending = self._pool.submit(self._write, z0, pieces)

    def _write(self, z0: int, pieces) -> None:
        for writer, piece in zip(self.writers, pieces, strict=True):
            writer.write(z0, piece)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._wait()
            elif self._pending is not None:
                self._pending.exception()  # wait; the exception being raised wins over the write's
        finally:
            self._pool.shutdown()
