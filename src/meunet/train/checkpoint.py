"""Resumable training state: written to a temporary name and renamed, loadable with ``weights_only=True``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meunet.errors import InputError
from meunet.io import atomic_output
from meunet.models.bundle import load_tensors


def rng_states() -> dict[str, Any]:
    """The global Python, NumPy and torch (CPU and CUDA) random states, as plain types and tensors."""
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global state is what we save)
    return {
        "python": random.getstate(),
        "numpy": {
            **numpy_state,
            "state": {
                **numpy_state["state"],
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            },
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name unique to the run, then rename over ``path`` (under its lock)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: the bytes do not depend on the temporary name
            torch.save(payload, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU, ``weights_only=True``).

    Raises:
        InputError: truncated, foreign or not a dict holding ``net`` (one line; see
            :func:`meunet.models.bundle.load_tensors`).
    """
    state = load_tensors(path)
    if not isinstance(state.get("net"), dict):
        raise InputError(path, "not a meunet checkpoint (no 'net' weights)")
    return state
