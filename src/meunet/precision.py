"""What the hardware computes with: the device (``auto``: :func:`resolve_device`) and the numeric precision
of forward passes (``fp32``, ``bf16`` or ``fp16`` autocast, and ``auto``).

``auto`` is bf16 autocast where the hardware computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs
that support bf16) and fp32 elsewhere. On this project's AMD EPYC (avx512_bf16), the demo model's
prediction took 2.2 s in bf16 against 9.5 s in fp32 with 99.998 % of labels equal (docs/inference.md).

>>> autocast_dtype("fp32") is None
True
>>> resolve_precision("fp32", "cpu")
'fp32'
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cache

import torch

from meunet.errors import InputError

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *AUTOCAST)


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: str | torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``name`` on ``device``; ``auto`` picks bf16 where native.

    Raises:
        ValueError: ``name`` is not one of :data:`PRECISIONS`.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    if name != "auto":
        return name
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return AUTOCAST[name]


def autocast(name: str, device: str | torch.device) -> AbstractContextManager:
    """``torch.autocast`` of a resolved precision on ``device``; nothing for fp32 and on ``meta`` (where
    autocast does not exist)."""
    kind = torch.device(device).type
    dtype = AUTOCAST[name]
    return nullcontext() if dtype is None or kind == "meta" else torch.autocast(kind, dtype=dtype)


DEVICES = ("auto", "cpu", "cuda", "mps")
"""The device kinds a run computes on (``meta``, which holds no data but counts bytes: ``meunet bench
memory``)."""


def check_device(name: str, kinds: tuple[str, ...] = DEVICES) -> str:
    """``name`` if it is one of ``kinds``, ``cuda:N`` or a kind with ``:0`` (as torch writes the CPU); its
    presence is not checked (:func:`resolve_device`).

    Raises:
        ValueError: another name (its message lists ``kinds``).

    >>> check_device("cuda:1"), check_device("cpu:0")
    ('cuda:1', 'cpu:0')
    """
    kind, colon, index = name.partition(":")
    if kind not in kinds or (
        colon and (kind == "auto" or not index.isdigit() or (kind != "cuda" and int(index)))
    ):
        *listed, last = [n for k in kinds for n in ((k, "cuda:N") if k == "cuda" else (k,))]
        raise ValueError(f"must be {', '.join(listed)} or {last}, not {name!r}")
    return name


def resolve_device(name: str, where: str = "device", kinds: tuple[str, ...] = DEVICES) -> torch.device:
    """``auto`` -> CUDA, else MPS, else CPU; a named device (:func:`check_device`) must be present.

    Args:
        where: what an error names (the config key ``device``, an option ``--device``).

    Raises:
        InputError: not a device name of ``kinds``, or a device that is not on this machine.
    """
    try:
        check_device(name, kinds)
    except ValueError as exc:
        raise InputError(where, str(exc)) from None
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    available = {
        "cpu": True,
        "meta": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available[device.type] or (
        device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    ):
        raise InputError(where, f"{name} is not available on this machine")
    return device if device.type == "cuda" else torch.device(device.type)  # cpu:0 is the CPU
