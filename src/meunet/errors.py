"""The one error type a user can cause.

Anything raised as :class:`InputError` ends the CLI with one line ``error: <path>: <what is wrong>`` on
stderr and exit status 2, having written nothing.
"""

from __future__ import annotations

from os import PathLike


class InputError(Exception):
    """Bad input a user can fix: missing or corrupt file, wrong shape, existing output, bad config.

    Args:
        path: the file or directory (or config key) the problem is about.
        message: what is wrong, in a few words, without the path.
    """

    def __init__(self, path: str | PathLike[str], message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self):  # rebuilt from its two parts when it crosses processes (Dask workers)
        return (InputError, (self.path, self.message))


class Elsewhere(Exception):
    """Under torchrun, rank 0 hit an error and reports it; another process stops with it silently (exit
    status 2 from the CLI)."""
