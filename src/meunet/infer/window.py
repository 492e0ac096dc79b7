"""Streaming sliding-window inference: window geometry, blending maps and the z-streaming engine.

The engine (:class:`SlidingWindow`) runs any network over any lazily sliceable volume and yields the
blended output slab by slab along z. It holds only

- one float32 accumulator of ``n_out x window_z x Y x X`` (plus a ``window_z x Y x X`` weight sum),
- one raw input slab of ``window_z x Y x X`` per source, in the source's own dtype,
- one batch of windows,

so host memory depends on the window and the slice size, never on the volume's depth. Windows are placed as
nnU-Net places them (evenly spread so that the last window ends at the border) and visited in z-start order;
once the windows of one z-start are done, every z below the next z-start is final and is yielded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from meunet.io import require_finite
from meunet.precision import PRECISIONS, autocast, resolve_precision

Blend = Literal["gaussian", "constant", "vote"]
BLENDS = ("gaussian", "constant", "vote")
Shape3 = tuple[int, int, int]
Region = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [lo, hi) per axis (z, y, x)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis, as nnU-Net places them.

    The target step is ``window * (1 - overlap)``; ``n = ceil((size - window) / step) + 1`` windows are spread
    evenly, ``round(linspace(0, size - window, n))``, so the first starts at 0 and the last ends at ``size``.
    An axis no longer than the window gets one window at 0 (the volume is padded up to the window).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if size <= window:
        return [0]
    n = math.ceil((size - window) / (window * (1 - overlap))) + 1
    return [int(s) for s in np.round(np.linspace(0, size - window, n))]


def check_settings(window: Sequence[int], overlap: float, blend: str, batch: int, precision: str) -> None:
    """ValueError unless these are valid sliding-window settings (see :class:`SlidingWindow`)."""
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be three positive sizes, got {tuple(window)}")
    window_starts(1, 1, overlap)  # validates overlap
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; use gaussian, constant or vote")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def windows_over(
    grid: Sequence[Sequence[int]], window: Sequence[int], region: Region, shape: Sequence[int]
) -> tuple[list[list[int]], Region]:
    """The windows of a volume's grid that overlap ``region``, and the part of the volume they cover.

    Args:
        grid: window starts per axis of the whole volume (:meth:`SlidingWindow.grid`).
        window: (wz, wy, wx).
        region: ``[lo, hi)`` per axis.
        shape: (Z, Y, X) of the volume.

    Returns:
        ``(starts, span)``: per axis the starts ``s`` with ``s < hi`` and ``s + w > lo`` (in grid order), and
        ``[min s, min(max s + w, size))`` per axis, which contains ``region``.
    """
    starts = [
        [s for s in axis if s < hi and s + w > lo]
        for axis, w, (lo, hi) in zip(grid, window, region, strict=True)
    ]
    span = tuple((s[0], min(s[-1] + w, n)) for s, w, n in zip(starts, window, shape, strict=True))
    return starts, span  # type: ignore[return-value]


def within(inner: Region, outer: Region) -> tuple[slice, slice, slice]:
    """Slices selecting ``inner`` from an array that holds ``outer``."""
    return tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inner, outer, strict=True))  # type: ignore[return-value]


def importance_map(window: Shape3, blend: Blend) -> np.ndarray:
    """Per-voxel weight of one window's output, float32 (wz, wy, wx).

    - ``gaussian``: separable Gaussian with sigma = window / 8 per axis, clamped below at
      ``max(min, 1e-3)``; built exactly as MONAI's ``compute_importance_map(mode="gaussian",
      sigma_scale=0.125)`` (and nnU-Net's map, up to a constant factor).
    - ``constant``: ones.
    - ``vote``: the centre-weighted vote of the paper's code (docs/method.md section 5), 2 inside the
      window's central half-cube (``[w // 4, w - w // 4)`` on every axis) and 1 elsewhere; used on one-hot
      hard labels.
    """
    if blend == "constant":
        return np.ones(window, np.float32)
    if blend == "vote":
        weights = np.ones(window, np.float32)
        weights[tuple(slice(n // 4, n - n // 4) for n in window)] = 2
        return weights
    if blend != "gaussian":
        raise ValueError(f"unknown blend {blend!r}; use gaussian, constant or vote")
    axes = [
        torch.exp(
            torch.arange(-(n - 1) / 2, (n - 1) / 2 + 1, dtype=torch.float32) ** 2 / (-2 * (n * 0.125) ** 2)
        )
        for n in window
    ]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weights.clamp(min=max(weights.min().item(), 1e-3)).numpy()


def label_dtype(n_classes: int) -> np.dtype:
    """The dtype of label maps of ``n_classes`` classes: uint8 up to 256 classes, uint16 beyond."""
    return np.dtype(np.uint8 if n_classes <= 256 else np.uint16)


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """Argmax over classes, slice by slice (no int64 slab): float (C, Z, Y, X) -> (Z, Y, X) labels of
    :func:`label_dtype` (uint8, or uint16 beyond 256 classes)."""
    labels = np.empty(scores.shape[1:], label_dtype(scores.shape[0]))
    for z in range(scores.shape[1]):
        labels[z] = np.argmax(scores[:, z], axis=0)
    return labels


def softmax_(scores: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of a float32 (C, ...) array, in place; returns the same array."""
    scores -= scores.max(axis=0)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=0)
    return scores


@dataclass(frozen=True)
class Input:
    """One input of the network, as the engine reads it.

    Attributes:
        array: (Z, Y, X) (one channel) or (C, Z, Y, X) array-like, sliced lazily along z (``array[z0:z1]``
            or ``array[:, z0:z1]`` must return numpy).
        transform: maps a raw window (C, wz, wy, wx) in the array's dtype to float32 of the same shape,
            e.g. intensity normalisation; None casts to float32.
        fill: raw value (scalar, or one per channel) of voxels past the border of a volume smaller than the
            window, applied before ``transform``; as training pads its patches (raw zeros for images,
            background one-hot for stage-1 probabilities).
        path: the file the array comes from; when given, a NaN or infinite voxel in a float array stops the
            stream with an :class:`InputError` naming it (checked slab by slab as the slabs are read).
    """

    array: Any
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    fill: float | tuple[float, ...] = 0.0
    path: str | None = None

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """The float32 network input of one raw window."""
        return raw.astype(np.float32) if self.transform is None else self.transform(raw)


@dataclass
class WindowCounts:
    """How many windows a stream visited and how many of them it skipped as empty."""

    windows: int = 0
    skipped: int = 0


@dataclass(frozen=True, kw_only=True)
class WindowSettings:
    """How windows are run and blended, whatever their size (keywords only).

    Attributes:
        overlap: fraction of the window shared by neighbours, in [0, 1); the step is window * (1 - overlap).
        blend: ``gaussian`` (default), ``constant`` or ``vote`` (see :func:`importance_map`). With ``vote``
            each window's output is turned into one-hot hard labels before weighting.
        batch: windows per forward pass.
        device: torch device the network runs on; accumulation stays on the host.
        precision: ``fp32``, ``bf16`` / ``fp16`` autocast, or ``auto`` (see :mod:`meunet.precision`).
        tta: average the outputs over the 8 flips of the three spatial axes.
    """

    overlap: float = 0.5
    blend: Blend = "gaussian"
    batch: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    tta: bool = False

    def window_settings(self) -> dict[str, Any]:
        """These settings as keyword arguments (of :class:`SlidingWindow`)."""
        return {f.name: getattr(self, f.name) for f in fields(WindowSettings)}


@dataclass(frozen=True)
class SlidingWindow(WindowSettings):
    """Settings of a sliding-window prediction: the window size (wz, wy, wx) in voxels, then the
    :class:`WindowSettings` by keyword, the precision resolved when made; :meth:`stream` runs it.

    >>> SlidingWindow((32, 32, 32), overlap=0.5).grid((40, 32, 100))
    [[0, 8], [0], [0, 14, 27, 41, 54, 68]]
    """

    window: Shape3

    def __post_init__(self) -> None:
        check_settings(self.window, self.overlap, self.blend, self.batch, self.precision)
        object.__setattr__(self, "precision", resolve_precision(self.precision, self.device))
        object.__setattr__(self, "window", tuple(int(w) for w in self.window))

    @cached_property
    def _weights(self) -> np.ndarray:
        """The window's importance map, made on first use (after any memory check of its window)."""
        return importance_map(self.window, self.blend)

    def grid(self, shape: Shape3) -> list[list[int]]:
        """Window starts per axis for a volume of ``shape`` (z, y, x), after padding it up to the window."""
        return [window_starts(max(s, w), w, self.overlap) for s, w in zip(shape, self.window, strict=True)]

    def probabilities_(self, scores: np.ndarray) -> np.ndarray:
        """Turn a yielded slab into probabilities in place: softmax of blended logits (gaussian, constant);
        with ``vote`` the scores already are vote fractions. float32 (C, dz, Y, X)."""
        return scores if self.blend == "vote" else softmax_(scores)

    def stream(
        self,
        net: Callable[..., torch.Tensor],
        inputs: Sequence[Input | np.ndarray],
        n_out: int,
        *,
        skip_below: float | None = None,
        skip_logits: Sequence[float] | None = None,
        start_z: int = 0,
        starts: Sequence[Sequence[int]] | None = None,
        counts: WindowCounts | None = None,
        progress: bool = False,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Predict a volume window by window and yield its blended output slab by slab along z.

        Args:
            net: called as ``net(*inputs)`` with one float32 tensor (B, C_i, wz, wy, wx) per input, on
                ``device``; returns (B, n_out, wz, wy, wx) logits. Put modules in eval mode first.
            inputs: :class:`Input` s (or bare arrays) of the same spatial shape; each array is read once,
                slab by slab, keeping ``window_z`` slices.
            n_out: number of output channels.
            skip_below: if set, a window whose raw first-input values are all below it is not run; it
                contributes ``skip_logits`` (an n_out vector, e.g. background-certain logits) everywhere.
            start_z: yield only z >= start_z (and run only windows reaching past it); the slabs are
                identical to those of a stream started at 0, so an interrupted prediction can resume.
            starts: window starts per axis, relative to the inputs, instead of :meth:`grid`'s: a block of a
                volume runs exactly the windows the whole volume's grid places over it (the inputs then
                hold the part those windows cover, :func:`windows_over`).
            counts: if given, its ``windows`` and ``skipped`` are increased as windows are visited.
            progress: show a tqdm bar over windows.

        Yields:
            ``(z0, scores)``: scores float32 (n_out, dz, Y, X) for z in [z0, z0 + dz), consecutive and
            covering [start_z, Z). Blended logits (weighted mean), or vote fractions for ``vote``. The array
            is a view into the engine's buffer, valid until the next slab is requested.
        """
        inputs = [_as_input(i) for i in inputs]
        shape = tuple(inputs[0].array.shape[-3:])
        if any(tuple(i.array.shape[-3:]) != shape for i in inputs):
            raise ValueError(f"inputs differ in spatial shape: {[tuple(i.array.shape) for i in inputs]}")
        if skip_below is not None and (skip_logits is None or len(skip_logits) != n_out):
            raise ValueError("skip_below needs skip_logits with one value per output channel")
        counts = counts if counts is not None else WindowCounts()
        wz, wy, wx = self.window
        zs, ys, xs = self.grid(shape) if starts is None else [list(s) for s in starts]
        padded = (zs[-1] + wz, ys[-1] + wy, xs[-1] + wx)
        rows = [i for i, z in enumerate(zs) if z + wz > start_z]
        acc = np.zeros((n_out, wz, *padded[1:]), np.float32)
        weight_sum = np.zeros((wz, *padded[1:]), np.float32)
        caches = [_SlabCache(i.array, wz, i.path) for i in inputs]
        skip_out = None if skip_below is None else self._skip_output(skip_logits)
        row = list(itertools.product(ys, xs))  # batches do not span rows of windows
        bar = tqdm(total=len(rows) * len(row), disable=not progress, unit="window")
        reader = ThreadPoolExecutor(1, thread_name_prefix="meunet-reader")
        try:
            for k, i in enumerate(rows):
                z0 = zs[i]
                if k:
                    _shift(acc, weight_sum, z0 - zs[rows[k - 1]])
                raw = [c.advance(z0, min(z0 + wz, shape[0])) for c in caches]
                if k + 1 < len(rows):  # the next row's new slices are read while this row runs
                    for c in caches:
                        c.read_ahead(zs[rows[k + 1]], min(zs[rows[k + 1]] + wz, shape[0]), reader)
                for b in range(0, len(row), self.batch):
                    batch = row[b : b + self.batch]
                    self._run_batch(net, inputs, raw, batch, acc, weight_sum, skip_below, skip_out, counts)
                    bar.update(len(batch))
                end = zs[i + 1] if i + 1 < len(zs) else padded[0]
                lo, hi = max(z0, start_z), min(end, shape[0])
                if hi > lo:
                    scores = acc[:, lo - z0 : hi - z0, : shape[1], : shape[2]]
                    np.divide(scores, weight_sum[lo - z0 : hi - z0, : shape[1], : shape[2]], out=scores)
                    yield lo, scores
        finally:
            reader.shutdown(cancel_futures=True)  # a read in flight ends first
            bar.close()

    def labels(
        self, net: Callable[..., torch.Tensor], inputs: Sequence[Input | np.ndarray], n_out: int, **kwargs
    ) -> np.ndarray:
        """Whole-volume labels (Z, Y, X) of :func:`label_dtype` in memory: :meth:`stream` followed by argmax
        (for blocks of a Dask array, tests, small volumes). ``kwargs`` go to :meth:`stream`."""
        out = np.empty(tuple(_as_input(inputs[0]).array.shape[-3:]), label_dtype(n_out))
        for z0, scores in self.stream(net, inputs, n_out, **kwargs):
            out[z0 : z0 + scores.shape[1]] = labels_from_scores(scores)
        return out

    def _run_batch(self, net, inputs, raw, batch, acc, weight_sum, skip_below, skip_out, counts) -> None:
        """Cut, pad and transform the windows of one batch, run the net, add weighted outputs to ``acc``."""
        run, windows = [], [[] for _ in raw]
        for y0, x0 in batch:
            counts.windows += 1
            crops = [r[:, :, y0 : y0 + self.window[1], x0 : x0 + self.window[2]] for r in raw]
            if skip_out is not None and crops[0].max() < skip_below:
                counts.skipped += 1
                self._add(acc, weight_sum, y0, x0, skip_out[:, None, None, None] * self._weights)
                continue
            run.append((y0, x0))
            for stack, crop, inp in zip(windows, crops, inputs, strict=True):
                stack.append(inp.prepare(self._pad(crop, inp.fill)))
        if not run:
            return
        batches = [stack[0][None] if len(stack) == 1 else np.stack(stack) for stack in windows]
        windows.clear()  # the batches hold the only copies while the net runs
        outputs = self._forward(net, batches)
        for (y0, x0), out in zip(run, outputs, strict=True):
            out *= self._weights
            self._add(acc, weight_sum, y0, x0, out)

    def _add(self, acc, weight_sum, y0, x0, weighted) -> None:
        acc[:, :, y0 : y0 + self.window[1], x0 : x0 + self.window[2]] += weighted
        weight_sum[:, y0 : y0 + self.window[1], x0 : x0 + self.window[2]] += self._weights

    def _pad(self, crop: np.ndarray, fill: float | Sequence[float]) -> np.ndarray:
        """Fill a raw (C, dz, dy, dx) crop up to the window at its far ends with ``fill`` (per channel)."""
        if crop.shape[1:] == self.window:
            return crop
        out = np.empty((crop.shape[0], *self.window), crop.dtype)
        out[...] = np.reshape(fill, (-1, 1, 1, 1))
        out[:, : crop.shape[1], : crop.shape[2], : crop.shape[3]] = crop
        return out

    def _forward(self, net, inputs: list[np.ndarray]) -> np.ndarray:
        """Run the net on one batch (with flips if ``tta``); float32 (B, n_out, wz, wy, wx) numpy scores."""
        tensors = [torch.from_numpy(a).to(self.device) for a in inputs]
        with torch.inference_mode(), autocast(self.precision, self.device):
            out = net(*tensors).float()
            if self.tta:
                for n in (1, 2, 3):
                    for dims in itertools.combinations((2, 3, 4), n):
                        out += net(*[t.flip(dims) for t in tensors]).float().flip(dims)
                out /= 8
            if self.blend == "vote":
                out = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
        return out.cpu().contiguous().numpy()  # features without gradients are channels-last

    def _skip_output(self, skip_logits: Sequence[float]) -> np.ndarray:
        """What a skipped window contributes per channel: the logits, or their one-hot vote."""
        logits = np.asarray(skip_logits, np.float32)
        if self.blend == "vote":
            return (np.arange(len(logits)) == np.argmax(logits)).astype(np.float32)
        return logits


def _as_input(value: Input | np.ndarray) -> Input:
    return value if isinstance(value, Input) else Input(value)


class _SlabCache:
    """The raw z-range [z0, z1) of one source, kept across window rows so each slice is read once; the
    slices the next row adds can be read ahead on a thread (:meth:`read_ahead`) while this row runs."""

    def __init__(self, source, depth: int, path: str | None = None) -> None:
        self.source = source
        self.path = path
        channels = source.shape[0] if source.ndim == 4 else 1
        self.buffer = np.empty((channels, depth, *source.shape[-2:]), source.dtype)
        self.z0 = self.z1 = 0
        self._ahead: tuple[int, int, Future] | None = None

    def advance(self, z0: int, z1: int) -> np.ndarray:
        """Cover [z0, z1) (z0 not decreasing); returns a view (C, z1 - z0, Y, X)."""
        keep = max(0, self.z1 - z0)
        for k in range(keep):  # slice by slice: overlapping copies would make numpy allocate a temporary
            self.buffer[:, k] = self.buffer[:, z0 - self.z0 + k]
        ahead, self._ahead = self._ahead, None
        if z1 > z0 + keep:
            read = ahead[2].result() if ahead is not None and ahead[:2] == (z0 + keep, z1) else None
            self.buffer[:, keep : z1 - z0] = self._read(z0 + keep, z1) if read is None else read
        self.z0, self.z1 = z0, z1
        return self.buffer[:, : z1 - z0]

    def read_ahead(self, z0: int, z1: int, pool: ThreadPoolExecutor) -> None:
        """Start reading on ``pool`` the slices that ``advance(z0, z1)`` will add to those held now."""
        if z1 > max(z0, self.z1):
            self._ahead = (max(z0, self.z1), z1, pool.submit(self._read, max(z0, self.z1), z1))

    def _read(self, z0: int, z1: int) -> np.ndarray:
        slab = np.asarray(self.source[:, z0:z1] if self.source.ndim == 4 else self.source[z0:z1][None])
        if self.path is not None:
            require_finite(self.path, z0, slab, z_axis=1)
        return slab


def _shift(acc: np.ndarray, weight_sum: np.ndarray, d: int) -> None:
    """Drop the first ``d`` (yielded) slices of the accumulators and zero the ``d`` freed at the end."""
    depth = weight_sum.shape[0]
    for k in range(depth - d):
        acc[:, k] = acc[:, k + d]
        weight_sum[k] = weight_sum[k + d]
    acc[:, max(depth - d, 0) :] = 0
    weight_sum[max(depth - d, 0) :] = 0
