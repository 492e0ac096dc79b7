"""Prediction of whole volumes from a model directory: single stage or cascade, streamed to disk.

:func:`predict` is the ``meunet predict`` command as a function. Host memory is that of the engine
(:mod:`meunet.infer.window`) plus one output chunk: labels are written slab by slab through
:func:`meunet.io.create_writer`, class probabilities through :class:`ProbabilityWriter`, and a cascade's
stage-1 output goes to a temporary float16 Zarr beside the output instead of RAM.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import zarr

from meunet.data.normalization import Normalization
from meunet.errors import InputError
from meunet.infer.postprocess import postprocess_slabs
from meunet.infer.window import Input, SlidingWindow, WindowCounts, label_dtype, labels_from_scores
from meunet.io import Volume, VolumeWriter, atomic_output, check_new_output, create_writer, open_volume

SKIP_MARGIN = 10.0  # a skipped window's logits: 0 for background, -SKIP_MARGIN for the others
ACTIVATION_FACTOR = 9  # inference activations ~ this x top width x window voxels x 4 bytes (measured, CPU)
RUNTIME_BYTES = 192 << 20  # thread pools and allocator caches that forward passes and writers add


class ProbabilityWriter(VolumeWriter):
    """Float16 per-class maps (C, Z, Y, X) in one Zarr v3 array, chunks (C, 64, 64, 64), slabs
    (C, dz, Y, X); temporary name, rename and resume as :func:`meunet.io.create_writer`'s writers.

    Args:
        path: output ``.zarr`` folder.
        shape: (Z, Y, X).
        channels: C.
        force: overwrite an existing output.
        resume: continue a partial output of an earlier run.
    """

    resumable = True

    def __init__(self, path, shape: Sequence[int], channels: int, force: bool = False, resume: bool = False):
        path = Path(path)
        check_new_output(path, force)
        if not path.name.endswith(".zarr"):
            raise InputError(path, "probabilities are written as Zarr: give a name ending in .zarr")
        geometry = Volume(np.broadcast_to(np.zeros((), np.float16), tuple(shape)))
        super().__init__(path, geometry, tuple(min(64, n) for n in shape), resume, force)
        self.channels = channels
        self.z_chunk = self.chunks[0]

    def _create(self) -> dict:
        self.array = zarr.create_array(
            self.target,
            shape=(self.channels, *self.shape),
            chunks=(self.channels, *self.chunks),
            dtype=np.float16,
            zarr_format=3,
            dimension_names=("c", "z", "y", "x"),
        )
        return {"channels": self.channels}

    def _reopen(self, state: dict) -> None:
        if state.get("channels") != self.channels:
            raise InputError(
                self.path, f"the partial output has {state.get('channels')} channels, not {self.channels}"
            )
        self.array = zarr.open_array(self.target, mode="r+")

    def write(self, z0: int, slab: np.ndarray) -> None:
        """Write ``slab`` (C, dz, Y, X) at slices ``z0 : z0 + dz``."""
        if slab.ndim != 4 or slab.shape[0] != self.channels or slab.shape[2:] != self.shape[1:]:
            raise ValueError(f"slab of shape {slab.shape} does not fit ({self.channels}, *{self.shape})")
        self.array[:, z0 : z0 + slab.shape[1]] = slab.astype(np.float16, copy=False)
        self._done[z0 : z0 + slab.shape[1]] = True
        self._log.write(f"[{z0}, {z0 + slab.shape[1]}]\n")
        self._log.flush()


def predict(
    model_dir: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    overlap: float = 0.5,
    blend: str = "gaussian",
    window: Sequence[int] | None = None,
    batch: int = 1,
    device: str = "cpu",
    precision: str = "auto",
    skip_empty: bool = False,
    air_threshold: float | None = None,
    tta: bool = False,
    probabilities: str | os.PathLike[str] | None = None,
    stats_json: str | os.PathLike[str] | None = None,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
    postprocess: bool = True,
) -> dict[str, Any]:
    """Segment a volume with a trained model directory and write labels (uint8, uint16 beyond 256 classes) in
    the input's geometry.

    Args:
        model_dir: directory written by training (``model.json``, ``stage1.pt``, optional ``stage2.pt``).
        input: image volume, any format :func:`meunet.io.open_volume` reads (read lazily, slab by slab).
        output: label volume to write (format from the suffix); written under a temporary name and renamed.
        overlap, blend, batch, device, precision, tta: see :class:`SlidingWindow`.
        window: (z, y, x) window; default ``model.json``'s ``window``.
        skip_empty: skip windows whose raw intensities all lie below ``air_threshold`` (default: one third
            of the way from the normalisation's ``clip_low`` to ``clip_high``); a skipped window counts as
            certain background (logits 0 for background, -10 for the other classes).
        probabilities: also write float16 class probabilities (C, Z, Y, X) to this ``.zarr``.
        stats_json: write ``voxels, seconds, voxels_per_second, peak_rss_bytes, windows, windows_skipped``.
        progress: print the memory estimate and show progress bars.
        force: overwrite existing outputs, and run even if the memory estimate exceeds available memory.
        resume: continue the partial output of an interrupted run with the same model and settings
            (formats the writers can resume, e.g. Zarr); the labels equal those of an uninterrupted run.
        postprocess: apply ``model.json``'s post-processing rules (:mod:`meunet.infer.postprocess`, chosen
            on validation by training): the raw labels then go to a Zarr scratch beside the output and are
            post-processed slab by slab into the output, in bounded memory.

    Returns:
        the statistics (also written to ``stats_json``), plus ``estimated_peak_bytes``.

    Raises:
        InputError: missing or corrupt model directory, unreadable input, input channels not matching the
            model, existing output without ``force``, or an estimate above available memory.
    """
    from meunet.models import load_model_dir

    start = time.perf_counter()
    output = Path(output)
    for path in (output, probabilities, stats_json):
        if path is not None:
            check_new_output(path, force)
    _check_device(device)
    bundle = load_model_dir(model_dir, device)
    volume = open_volume(input)
    if bundle.meta["in_channels"] != 1:
        raise InputError(
            input, f"the model expects {bundle.meta['in_channels']} input channels, the image has 1"
        )
    window = window or bundle.meta.get("window")
    if window is None:
        raise InputError(Path(model_dir) / "model.json", "no default 'window': give one (--window Z Y X)")
    try:
        engine = SlidingWindow(tuple(window), overlap, blend, batch, device, precision, tta)
    except ValueError as exc:
        raise InputError("settings", str(exc)) from None
    try:
        normalization = Normalization.from_dict(bundle.meta["normalization"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(Path(model_dir) / "model.json", f"no valid 'normalization' ({exc!r})") from None
    estimate = estimate_peak_bytes(bundle, engine, volume, probabilities is not None)
    _check_memory(
        input, estimate, force, progress, f"{tuple(volume.array.shape)} voxels, window {engine.window}"
    )
    image = Input(volume.array, normalization.apply, path=str(input))
    n_classes = len(bundle.classes)
    skip = _skip_settings(normalization, n_classes, air_threshold) if skip_empty else {}
    shape = tuple(volume.array.shape)
    counts = WindowCounts()
    rules = (bundle.meta.get("postprocessing") or {}) if postprocess else {}
    # raw labels to be post-processed: a fixed name, so that --resume finds them
    raw = output.parent / f".{output.name}.raw.zarr" if rules else output
    with ExitStack() as stack:
        writers = [
            stack.enter_context(
                create_writer(
                    raw, shape, label_dtype(n_classes), volume, force=force or bool(rules), resume=resume
                )
            )
        ]
        if probabilities is not None:
            writer = ProbabilityWriter(probabilities, shape, n_classes, force=force, resume=resume)
            writers.append(stack.enter_context(writer))
        align = math.lcm(*(w.z_chunk for w in writers))
        start_z = _written_prefix(writers, align)
        inputs = [image]
        if bundle.stage2 is not None and start_z < shape[0]:
            # a fixed name, so that the next run clears what a killed run left
            scratch = output.parent / f".{output.name}.stage1.zarr"
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            inputs.append(
                _stage1_input(bundle.stage2, image, scratch, engine, start_z, counts, progress, skip)
            )
        scores = engine.stream(
            bundle.net, inputs, n_classes, start_z=start_z, counts=counts, progress=progress, **skip
        )
        for z0, slabs in _aligned(_outputs(engine, scores, probabilities is not None), align, shape[0]):
            for writer, slab in zip(writers, slabs, strict=True):
                writer.write(z0, slab)
    if rules:
        with create_writer(output, shape, label_dtype(n_classes), volume, force=force) as writer:
            for z0, slab in _aligned(((z, (s,)) for z, s in postprocess_slabs(open_volume(raw).array, rules)),
                                     writer.z_chunk, shape[0]):  # fmt: skip
                writer.write(z0, slab[0])
        shutil.rmtree(raw)
    seconds = time.perf_counter() - start
    voxels = math.prod(shape)
    stats = {
        "voxels": voxels,
        "seconds": seconds,
        "voxels_per_second": voxels / seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "windows": counts.windows,
        "windows_skipped": counts.skipped,
        "estimated_peak_bytes": estimate,
        "postprocessing": rules,
    }
    if stats_json is not None:
        _write_json(Path(stats_json), stats)
    return stats


def _check_device(device: str) -> None:
    """InputError unless torch can put a tensor on ``device``."""
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise InputError("--device", f"cannot use {device!r}: {str(exc).splitlines()[0]}") from None


def _check_memory(input, estimate: int, force: bool, progress: bool, what: str) -> None:
    """Print the estimate (when ``progress``); InputError if it exceeds available memory, unless ``force``."""
    available = psutil.virtual_memory().available
    if progress:
        print(
            f"meunet predict: {what}: estimated peak memory {estimate / 2**30:.2f} GiB "
            f"({available / 2**30:.2f} GiB available)",
            file=sys.stderr,
        )
    if estimate > available and not force:
        raise InputError(
            input,
            f"prediction needs about {estimate / 2**30:.2f} GiB, only {available / 2**30:.2f} GiB available "
            "(smaller --window or --batch, or --force to try anyway)",
        )


def _skip_settings(normalization: Normalization, n_classes: int, air_threshold: float | None) -> dict:
    """:meth:`SlidingWindow.stream` arguments that skip air windows: the threshold (default one third of the
    way from ``clip_low`` to ``clip_high``) and background-certain logits."""
    low, high = normalization.clip_low, normalization.clip_high
    threshold = low + (high - low) / 3 if air_threshold is None else air_threshold
    return {"skip_below": threshold, "skip_logits": [0.0] + [-SKIP_MARGIN] * (n_classes - 1)}


def _stage1_input(
    cascade, image: Input, scratch: Path, engine, start_z: int, counts, progress, skip
) -> Input:
    """Stage 1 over the rows that stage 2 still needs (from the first window reaching past ``start_z``),
    written to ``scratch``; returned as stage 2's second input, padded as training pads it."""
    first_row = min(z for z in engine.grid(image.array.shape)[0] if z + engine.window[0] > start_z)
    probs = cascade.stage1_output == "probs"
    stage1 = predict_stage1(
        cascade, image, scratch, engine, start_z=first_row, counts=counts, progress=progress, force=True,
        **(skip if probs else {}),
    )  # fmt: skip
    fill = (1.0,) + (0.0,) * (cascade.stage1_channels - 1) if probs else (0.0,)  # certain background
    return Input(stage1, fill=fill)


def predict_stage1(
    cascade,
    image: Input,
    output: str | os.PathLike[str],
    engine: SlidingWindow,
    *,
    start_z: int = 0,
    counts: WindowCounts | None = None,
    progress: bool = False,
    force: bool = False,
    skip_below: float | None = None,
    skip_logits: Sequence[float] | None = None,
) -> zarr.Array:
    """Stage-1 output of a whole volume, as the cascade's stage 2 consumes it, to a float16 Zarr.

    Used for cascade prediction and for caching stage-1 output of training volumes. With
    ``cascade.stage1_output == "probs"`` the blended stage-1 logits are turned into softmax probabilities;
    with ``"features"`` the blended last-decoder features are stored as they are.

    Args:
        cascade: a :class:`meunet.models.Cascade` (its ``stage1`` and ``stage1_output`` are used), eval mode.
        image: the normalised image input, e.g. ``Input(volume.array, normalization.apply)``.
        output: ``.zarr`` path of the (stage1_channels, Z, Y, X) float16 array.
        engine: window settings.
        start_z: compute only z >= start_z (the rest of the array stays zero).
        counts, progress, skip_below, skip_logits: passed to :meth:`SlidingWindow.stream`.
        force: overwrite an existing ``output``.

    Returns:
        the written array, opened read-only.
    """
    probs = cascade.stage1_output == "probs"
    net = cascade.stage1 if probs else cascade.stage1.features
    shape = tuple(image.array.shape[-3:])
    channels = cascade.stage1_channels
    stream = engine.stream(
        net, [image], channels, start_z=start_z, counts=counts, progress=progress,
        skip_below=skip_below, skip_logits=skip_logits,
    )  # fmt: skip
    with ProbabilityWriter(output, shape, channels, force=force) as writer:
        halves = ((z0, ((engine.probabilities_(s) if probs else s).astype(np.float16),)) for z0, s in stream)
        for z0, (slab,) in _aligned(halves, writer.z_chunk, shape[0]):
            writer.write(z0, slab)
    return zarr.open_array(output, mode="r")


def estimate_peak_bytes(bundle, engine: SlidingWindow, volume: Volume, probabilities: bool) -> int:
    """Estimated peak resident memory of :func:`predict`, in bytes.

    The sum of: this process's resident memory now (interpreter, torch, model weights) plus
    ``RUNTIME_BYTES`` for thread pools and allocator caches; the engine's
    accumulators (classes + 1 float32 maps of ``window_z x Y x X``) and raw input slabs (image, plus stage-1
    float16 output for a cascade); one batch of windows in and out; network activations (about
    ``ACTIVATION_FACTOR`` float32 maps of the top level's width per window voxel, measured on CPU); and the
    output slabs (uint8 labels, float32 scores, float16 probabilities) of one window depth plus one chunk,
    twice (the writers copy). On CPU (benchmarks/infer_vs_monai.py, docs/inference.md) it came out 3 to
    8 % above the measured peak resident memory.
    """
    wz, wy, wx = engine.window
    y, x = (max(s, w) for s, w in zip(volume.array.shape[1:], engine.window[1:], strict=True))
    n_classes = len(bundle.classes)
    plane = y * x
    stage1_channels = 0 if bundle.stage2 is None else bundle.stage2.stage1_channels
    widths = [bundle.meta["stage1"]["widths"][0]]
    if bundle.stage2 is not None:
        widths.append(bundle.meta["stage2"]["widths"][0] + stage1_channels)
    padded = math.prod(-(-w // 16) * 16 for w in engine.window)
    window_voxels = wz * wy * wx
    accumulators = (max(n_classes, stage1_channels) + 1) * wz * plane * 4
    input_slabs = wz * plane * (np.dtype(volume.array.dtype).itemsize + 2 * stage1_channels)
    batch = engine.batch * window_voxels * 4 * (1 + stage1_channels + 3 * n_classes)
    activations = engine.batch * padded * 4 * ACTIVATION_FACTOR * max(widths)
    out_depth = wz + 64
    outputs = 2 * out_depth * plane * (1 + (2 * n_classes + 8 if probabilities or stage1_channels else 0))
    now = psutil.Process().memory_info().rss
    return int(now + RUNTIME_BYTES + accumulators + input_slabs + batch + activations + outputs)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _outputs(engine: SlidingWindow, scores: Iterable, probabilities: bool) -> Iterator[tuple[int, tuple]]:
    """Labels (uint8 (dz, Y, X)) and, when asked, float16 probabilities (C, dz, Y, X) of each slab."""
    for z0, slab in scores:
        labels = labels_from_scores(slab)
        if probabilities:
            yield z0, (labels, engine.probabilities_(slab).astype(np.float16))
        else:
            yield z0, (labels,)


def _aligned(slabs: Iterable[tuple[int, tuple]], align: int, end: int) -> Iterator[tuple[int, tuple]]:
    """Regroup consecutive slabs (tuples of arrays, z on axis -3) into pieces that start and end on multiples
    of ``align`` (or at ``end``), so that each write fills whole Zarr chunks."""
    pending: list[tuple] = []
    start = None
    for z0, arrays in slabs:
        start = z0 if start is None else start
        pending.append(arrays)
        z1 = z0 + arrays[0].shape[-3]
        cut = z1 if z1 == end else z1 // align * align
        if cut > start:
            joined = [np.concatenate([p[k] for p in pending], axis=-3) for k in range(len(arrays))]
            yield start, tuple(j[..., : cut - start, :, :] for j in joined)
            rest = tuple(j[..., cut - start :, :, :] for j in joined)
            pending = [rest] if rest[0].shape[-3] else []
            start = cut


def _written_prefix(writers: Sequence[VolumeWriter], align: int) -> int:
    """First z (a multiple of ``align``) from which some writer still lacks slices (0 for a fresh run)."""
    depth = writers[0].shape[0]
    z = 0
    while z < depth and all(w.is_written(z, min(z + align, depth)) for w in writers):
        z += align
    return min(z, depth)


def _write_json(path: Path, values: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(values, indent=2) + "\n")
