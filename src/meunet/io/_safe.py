"""Safe outputs: one writer per output, a temporary name unique to the run, rename at last.

Every file or folder meunet writes goes through :func:`atomic_output` (or, for the streaming volume writers,
:func:`output_lock` around their ``.<name>.partial/`` folder):

* :func:`check_new_output` refuses an existing output unless ``--force`` was given;
* :func:`output_lock` takes an exclusive lock on ``.<name>.lock`` beside the output (``filelock``, an
  ``flock`` that the kernel drops when the process dies, so ``kill -9`` leaves no stale lock); a second run
  writing the same output stops with one line instead of interleaving with the first;
* :func:`atomic_output` builds the output under ``.<name>.<pid>-<token>.tmp`` and renames it into place only
  when the block ends cleanly; on any failure the temporary is removed and a full disk, a read-only file
  system or a permission problem becomes one :class:`InputError` line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

from filelock import FileLock, Timeout

from meunet.errors import InputError

# write failures a user fixes (space, quota, read-only mount, permissions): one line, not a traceback
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


# the files of the folders meunet writes: Zarr metadata and chunks, TIFF slices, an ONNX export
_OWN_FILE = re.compile(
    r"zarr\.json|\.z(group|array|attrs|metadata)|\d+(\.\d+)*|slice_\d+\.tif|[\w.-]+\.onnx|export\.json"
)


def foreign_file(folder: Path) -> Path | None:
    """The first file (or link, or other non-folder) under ``folder`` that no meunet folder output holds
    (see :func:`check_new_output`), or None."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            if not _OWN_FILE.fullmatch(name) or os.path.islink(os.path.join(root, name)):
                return Path(root, name)
    return None


def check_new_output(path: str | PathLike[str], force: bool) -> None:
    """Refuse an output that exists already (a dangling link included) unless ``force``; with ``force``,
    refuse a folder holding anything that meunet's folder outputs (Zarr stores, TIFF slice folders, ONNX
    exports) do not hold: ``--force`` replaces a meunet output, never a folder of the user's.

    Raises:
        InputError: ``path`` is no output name (``.``, ``..``), exists and ``force`` is false, or is a
            folder holding a file meunet did not write.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise InputError(path, "is not an output name: give a file or folder name")
    if not os.path.lexists(path):
        return
    if not force:
        raise InputError(path, "output exists; use --force to overwrite it")
    if path.is_dir() and not path.is_symlink() and (foreign := foreign_file(path)) is not None:
        raise InputError(
            path,
            f"holds {foreign.relative_to(path)}, which meunet did not write: --force replaces only meunet's "
            "outputs; move it away or choose another output name",
        )


def check_outputs(
    outputs: Iterable[str | PathLike[str] | None],
    force: bool,
    inputs: Iterable[str | PathLike[str] | None] = (),
    new_folder: str | PathLike[str] | None = None,
) -> None:
    """:func:`check_new_output` for each output given (None: not asked for), after checking that no output
    is an input, a folder holding an input, or inside an input folder (a model directory), nor another
    output of the same command (refused even with ``force``: writing it would destroy what is being read,
    or one output would overwrite the other), and that its folder exists (or is
    ``new_folder``, which the command creates, in an existing folder).

    Raises:
        InputError: an output that is an input or given twice, that exists without ``force``, or whose
            folder does not exist.

    >>> check_outputs(["labels.nii.gz", "labels.nii.gz"], force=True)
    Traceback (most recent call last):
    meunet.errors.InputError: labels.nii.gz: given for two outputs of one command; give each its own name
    """
    read = {_resolved(p) for p in inputs if p is not None}
    written: set[Path] = set()
    for path in (p for p in outputs if p is not None):
        resolved = _resolved(path)
        if any(resolved == r or resolved in r.parents or r in resolved.parents for r in read):
            raise InputError(
                path, "is, holds or lies in an input of this command; write the output under another name"
            )
        if resolved in written:
            raise InputError(path, "given for two outputs of one command; give each its own name")
        written.add(resolved)
        check_new_output(path, force)
        folder = Path(path).absolute().parent
        if new_folder is not None and folder == Path(new_folder).absolute():
            folder = folder.parent
        if not folder.is_dir():
            raise InputError(Path(path).parent, "the output folder does not exist")


def _resolved(path: str | PathLike[str]) -> Path:
    """``Path(path).resolve()``; a loop of symbolic links is one :class:`InputError`."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # RuntimeError before Python 3.13, OSError (ELOOP) after
        raise InputError(path, "is a loop of symbolic links: remove them or choose another name") from None


def require_suffix(path: str | PathLike[str] | None, suffix: str, what: str) -> None:
    """Refuse an output ``path`` (None: not asked for) whose name does not end in ``suffix``: ``what`` it
    is gets written in that format whatever its name (and ``--json results/`` would write a file
    ``results``).

    >>> require_suffix("overlay.jpg", ".png", "the overlay is a PNG")
    Traceback (most recent call last):
    meunet.errors.InputError: overlay.jpg: the overlay is a PNG: give a name ending in .png
    """
    if path is not None and Path(path).suffix.lower() != suffix:
        raise InputError(path, f"{what}: give a name ending in {suffix}")


def user_error(path: str | PathLike[str], exc: OSError) -> InputError | None:
    """One :class:`InputError` line for a write failure a user can fix (disk full, read-only ...), or None."""
    if exc.errno in USER_ERRNOS:
        return InputError(path, f"cannot write: {exc.strerror or os.strerror(exc.errno)}")
    return None


@contextmanager
def output_lock(path: str | PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` (file ``.<name>.lock`` beside it, removed at the end).

    Raises:
        InputError: another process (or another writer in this one) holds the lock, or the folder does not
            exist (the lock would create it) or cannot take the lock file (read-only, full, no permission).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(path.parent, "the output folder does not exist")
    lock_path = path.parent / f".{path.name}.lock"
    lock = FileLock(lock_path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(path, "another run is writing this output; wait for it or choose another") from None
    except OSError as exc:
        raise (user_error(path, exc) or exc) from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: a waiting writer sees the inode is gone
        lock.release()


def temporary_name(path: str | PathLike[str]) -> Path:
    """``.<stem>.<pid>-<random token>.tmp<suffix>`` beside ``path``: unique to this run and this call (the
    suffix is kept for writers that choose the format from it)."""
    path = Path(path)
    return path.parent / f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}"


def remove(path: Path) -> None:
    """Remove a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | PathLike[str], force: bool = True) -> Iterator[Path]:
    """Lock ``path``, yield a temporary path unique to this run, and rename it onto ``path`` at a clean end.

    The caller writes a file (or builds a folder) at the yielded path. A folder replaces an existing
    ``path`` folder, which is removed after the rename. On an exception the temporary is removed.

    Args:
        path: the final output.
        force: replace an existing output (checked again once the lock is held).

    Raises:
        InputError: the output exists and ``force`` is false, another run writes it, or the disk is full,
            read-only or not writable.
    """
    path = Path(path)
    with output_lock(path):
        check_new_output(path, force)
        tmp = temporary_name(path)
        old = None
        try:
            yield tmp
            if (path.is_dir() and not path.is_symlink()) or (tmp.is_dir() and os.path.lexists(path)):
                # rename cannot replace a folder, nor a file by a folder: move it aside
                old = temporary_name(path)
                os.replace(path, old)
            os.replace(tmp, path)
        except OSError as exc:
            remove(tmp)
            if old is not None and not path.exists():
                os.replace(old, path)
            raise (user_error(path, exc) or exc) from None
        except BaseException:
            remove(tmp)
            raise
        if old is not None:
            remove(old)


def write_json(path: str | PathLike[str], value, indent: int = 2, force: bool = True) -> None:
    """Write ``value`` as indented JSON plus a newline through :func:`atomic_output`."""
    with atomic_output(path, force) as tmp:
        tmp.write_text(json.dumps(value, indent=indent) + "\n")
