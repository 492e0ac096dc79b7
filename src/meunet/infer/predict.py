"""Prediction of whole volumes from a model directory: single stage or cascade, streamed to disk.

:func:`predict` is the ``meunet predict`` command as a function. Host memory is that of the engine
(:mod:`meunet.infer.window`) plus one output chunk: labels are written slab by slab through
:func:`meunet.io.create_writer`, class probabilities through its per-channel Zarr writer, and a cascade's
stage-1 output goes to a temporary float16 Zarr beside the output instead of RAM.

The window is what sets the memory: unless one is given, each volume gets the largest window (at most the
model's) whose estimated peak (:func:`peak_estimator`) fits the memory budget (:func:`memory_budget`), chosen
by :func:`choose_window`, a pure function of the estimate.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zarr

from meunet.data.normalization import Normalization
from meunet.errors import InputError
from meunet.infer.postprocess import apply_rules, postprocess_slabs
from meunet.infer.window import (
    Input,
    Region,
    Shape3,
    SlidingWindow,
    WindowCounts,
    WindowSettings,
    check_settings,
    label_dtype,
    labels_from_scores,
    windows_over,
    within,
)
from meunet.io import (
    Volume,
    VolumeWriter,
    WriteBehind,
    check_outputs,
    create_writer,
    open_volume,
    partial_run,
    require_suffix,
    write_json,
)
from meunet.memory import peak_rss_bytes
from meunet.models.bundle import model_digest
from meunet.models.cascade import stage1_fill
from meunet.models.unet import MULTIPLE
from meunet.precision import resolve_device

SKIP_MARGIN = 10.0  # a skipped window's logits: 0 for background, -SKIP_MARGIN for the others
# One forward pass without gradients (meunet.models.unet.UNet3D.lean_features), per precision: it holds
# `maps` maps of the top level's width in the precision's bytes plus `voxel` bytes (input, logits and their
# copies) per padded window voxel, and the run adds `runtime` bytes (thread pools, oneDNN's kernels and
# caches, the writers' buffers). Fitted to the peaks benchmarks/predict_memory.py measured on the CPU
# (docs/inference.md: every row within -6 to +17 %); fp16 is taken to be bf16's (not measured).
ACTIVATIONS = {
    "fp32": {"maps": 1.9, "voxel": 16, "runtime": 96 << 20},
    "bf16": {"maps": 2.2, "voxel": 4, "runtime": 32 << 20},
    "fp16": {"maps": 2.2, "voxel": 4, "runtime": 32 << 20},
}
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
MEMORY_MARGIN = 0.9  # the default budget: this share of the memory available when prediction starts
MAX_COVERAGE = 1000  # refused above: the windows predict every voxel this many times on average (overlap 0.9)


@dataclass(frozen=True, kw_only=True)
class PredictSettings(WindowSettings):
    """How a model is applied to volumes (keywords only); checked when made.

    Attributes:
        window: (z, y, x) window; None takes ``model.json``'s ``window``.
        overlap, blend, batch, device, precision, tta: see :class:`WindowSettings` (device and precision
            ``auto`` by default; the device is resolved when the settings are made, :func:`resolve_device`).
        skip_empty: skip windows whose raw intensities all lie below ``air_threshold`` (default: one third
            of the way from the normalisation's ``clip_low`` to ``clip_high``); a skipped window counts as
            certain background (logits 0 for background, -10 for the other classes).
        air_threshold: see ``skip_empty``.
        postprocess: apply ``model.json``'s post-processing rules (:mod:`meunet.infer.postprocess`, chosen
            on validation by training).
        memory_gib: the memory budget in GiB (:func:`memory_budget`; None: :data:`MEMORY_MARGIN` of what is
            available). Without ``window``, each volume gets the largest window that fits it (at most the
            model's, :func:`choose_window`); a given ``window`` whose estimate exceeds it is refused.

    Raises:
        InputError: a window, overlap, blend, batch, precision, air threshold or memory budget out of range
            (one line).

    >>> PredictSettings(overlap=0.25).overlap
    0.25
    >>> PredictSettings(blend="median")
    Traceback (most recent call last):
    meunet.errors.InputError: settings: unknown blend 'median'; use gaussian, constant or vote
    """

    window: tuple[int, int, int] | None = None
    device: str = "auto"
    precision: str = "auto"
    skip_empty: bool = False
    air_threshold: float | None = None
    tta: bool = False
    postprocess: bool = True
    memory_gib: float | None = None

    def __post_init__(self) -> None:
        window = None if self.window is None else tuple(int(w) for w in self.window)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "device", str(resolve_device(self.device, "--device")))
        try:
            check_settings(window or (1, 1, 1), self.overlap, self.blend, self.batch, self.precision)
        except ValueError as exc:
            raise InputError("settings", str(exc)) from None
        if window is not None and min(window) < MULTIPLE:
            raise InputError(
                "settings",
                f"window {window}: every side must be at least {MULTIPLE} (the networks pad a window to a "
                f"multiple of {MULTIPLE}; a volume thinner than the window is padded)",
            )
        if self.air_threshold is not None and not math.isfinite(self.air_threshold):
            raise InputError("settings", f"air threshold must be finite, got {self.air_threshold}")
        if self.memory_gib is not None and not (math.isfinite(self.memory_gib) and self.memory_gib > 0):
            raise InputError(
                "settings", f"memory budget must be a positive number of GiB, got {self.memory_gib}"
            )


@dataclass(frozen=True)
class WindowChoice:
    """The window a volume is predicted with, and why.

    Attributes:
        window: (z, y, x).
        estimate: its estimated peak memory (bytes, :func:`peak_estimator`).
        budget: the memory budget (bytes) and ``budget_source``, what set it (:func:`memory_budget`).
        how: ``given`` (``--window``), ``resumed`` (the interrupted run's), ``the model's`` (it fits), ``the
            largest that fits`` or, where none fits, ``the smallest``.
        fits: the largest window that fits the budget (:func:`choose_window`), None if none does.
    """

    window: Shape3
    estimate: int
    budget: int
    budget_source: str
    how: str
    fits: Shape3 | None

    def line(self, shape: Sequence[int]) -> str:
        """What ``meunet predict`` prints before the first window."""
        return (
            f"{tuple(shape)} voxels, window {self.window} ({self.how}): estimated peak memory "
            f"{_gib(self.estimate)}, budget {_gib(self.budget)} ({self.budget_source})"
        )

    def refusal(self) -> str | None:
        """The one-line reason to refuse the run (its estimate exceeds the budget), or None if it fits."""
        if self.estimate <= self.budget:
            return None
        over = (
            f"needs about {_gib(self.estimate)}, more than the budget of {_gib(self.budget)} "
            f"({self.budget_source})"
        )
        largest = "no window fits" if self.fits is None else f"the largest window that fits is {self.fits}"
        if self.how == "resumed":
            return (
                f"the interrupted run's window {self.window} {over}; {largest}: --force to resume anyway, or "
                "start again without --resume"
            )
        if self.how == "given":
            return f"window {self.window} {over}; {largest}: a smaller --window, or --force to try anyway"
        return (
            f"even the smallest window {self.window} {over}: a larger --memory-gib, or --force to try anyway"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_budget(memory_gib: float | None = None, share: float = 1.0) -> tuple[int, str]:
    """The bytes a prediction may use (its whole process's peak resident memory) and what set them:
    ``memory_gib`` GiB, or :data:`MEMORY_MARGIN` of the memory available now (``psutil``), times ``share``
    (the share of one of several worker processes)."""
    if memory_gib is not None:
        return int(memory_gib * 2**30), f"--memory-gib {memory_gib:g}"
    available = psutil.virtual_memory().available
    each = "" if share == 1 else f", shared by {round(1 / share)} workers"
    source = f"{MEMORY_MARGIN:.0%} of the {_gib(available)} available{each}"
    return int(MEMORY_MARGIN * available * share), source


def window_candidates(stored: Sequence[int]) -> list[Shape3]:
    """The windows :func:`choose_window` considers, smallest first: ``min(w, n)`` per axis of the model's
    window ``stored`` for n = 16, 32, 48, ... (the networks pad every side to a multiple of 16, so other sizes
    would only compute padding), then ``stored`` itself (a cube stays a cube; a shorter axis keeps its size).

    >>> window_candidates((48, 40, 48))
    [(16, 16, 16), (32, 32, 32), (48, 40, 48)]
    """
    stored = tuple(int(w) for w in stored)
    sides = range(MULTIPLE, max(stored), MULTIPLE)
    candidates = [tuple(min(w, n) for w in stored) for n in sides] + [stored]
    return list(dict.fromkeys(candidates))  # type: ignore[arg-type]


def choose_window(stored: Sequence[int], estimate: Callable[[Shape3], int], budget: int) -> Shape3 | None:
    """The largest of :func:`window_candidates` (``stored``) whose ``estimate`` (bytes of peak memory, a
    function of the window) is at most ``budget`` bytes; None if not even the smallest fits. A pure
    function of the estimate: nothing is run.

    >>> choose_window((96, 96, 96), lambda w: w[0] ** 3, 70**3)
    (64, 64, 64)
    """
    for window in reversed(window_candidates(stored)):
        if estimate(window) <= budget:
            return window
    return None


class Predictor:
    """A model directory loaded and checked once, with fixed settings, then applied to any number of volumes:
    :meth:`predict` streams a file to a file, :meth:`labels` an array to labels in memory, :meth:`block` one
    block of a Dask run (:mod:`meunet.distributed`). All three run the same windows with the same weights,
    so a voxel gets the same label from each.

    Args:
        model_dir: directory written by training (``model.json``, ``stage1.pt``, optional ``stage2.pt``),
            loaded onto ``settings.device``.
        settings: how to apply it.

    Attributes:
        settings: ``settings`` with ``window`` filled in from ``model.json``; :meth:`predict` chooses each
            volume's window for the memory budget unless ``window_given`` (``settings.window`` was given).
        stored_window: ``model.json``'s window (the given one for a model without), the largest chosen.
        bundle: the loaded model directory; engine: the sliding-window engine; normalization: the model's;
        skip: the :meth:`SlidingWindow.stream` arguments that skip air windows (empty unless ``skip_empty``);
        rules: the post-processing rules to apply (empty when ``postprocess`` is off).

    Raises:
        InputError: missing or corrupt model directory, a model without one input channel, no window, no
            valid normalisation, or a device torch cannot use.

    >>> predictor = Predictor(model_dir, PredictSettings(overlap=0.25))
    >>> stats = predictor.predict(image_path, tmp / "a.nii.gz", progress=False)
    >>> stats = predictor.predict(image_path, tmp / "b.nii.gz", progress=False)
    >>> bool((read_volume(tmp / "a.nii.gz").array == read_volume(tmp / "b.nii.gz").array).all())
    True
    """

    def __init__(self, model_dir: str | os.PathLike[str], settings: PredictSettings = PredictSettings()):
        from meunet.models import load_model_dir

        self.model_dir = Path(model_dir)
        model_json = self.model_dir / "model.json"
        self.bundle = bundle = load_model_dir(model_dir, settings.device)
        if bundle.meta["in_channels"] != 1:
            raise InputError(
                model_json, f"the model expects {bundle.meta['in_channels']} input channels, not 1"
            )
        self.window_given = settings.window is not None
        window = settings.window or bundle.meta.get("window")
        if window is None:
            raise InputError(model_json, "no default 'window': give one (--window Z Y X)")
        self.stored_window: Shape3 = tuple(bundle.meta.get("window") or window)  # type: ignore[assignment]
        self.settings = s = replace(settings, window=tuple(window))
        self.engine = SlidingWindow(s.window, **s.window_settings())
        try:
            self.normalization = Normalization.from_dict(bundle.meta["normalization"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(model_json, f"no valid 'normalization' ({exc!r})") from None
        self.n_classes = len(bundle.classes)
        self.skip = (
            _skip_settings(self.normalization, self.n_classes, s.air_threshold) if s.skip_empty else {}
        )
        self.rules = (bundle.meta.get("postprocessing") or {}) if s.postprocess else {}

    def check_windows(
        self, shape: Sequence[int], path: str | os.PathLike[str], window: Sequence[int] | None = None
    ) -> int:
        """The number of windows (of ``window``, default the settings') over a (Z, Y, X) volume of ``shape``,
        counted without placing them.

        Raises:
            InputError: every voxel would be predicted more than :data:`MAX_COVERAGE` times on average (an
                overlap close to 1), naming the count.
        """

        window = tuple(self.engine.window if window is None else window)

        def count(overlap: float) -> int:
            step = [w * (1 - overlap) for w in window]
            return math.prod(
                1 if n <= w else math.ceil((n - w) / d) + 1
                for n, w, d in zip(shape, window, step, strict=True)
            )

        windows = count(self.engine.overlap)
        padded = math.prod(max(n, w) for n, w in zip(shape, window, strict=True))
        coverage = windows * math.prod(window) / padded
        if coverage > MAX_COVERAGE:
            raise InputError(
                path,
                f"overlap {self.engine.overlap} places {windows:,} windows of {window} (every "
                f"voxel predicted about {coverage:,.0f} times on average; at most {MAX_COVERAGE:,}): use an "
                f"overlap of at most 0.9 (0.5 places {count(0.5):,})",
            )
        return windows

    def window_for(
        self,
        shape: Sequence[int],
        dtype: np.dtype | type = np.uint8,
        probabilities: bool = False,
        *,
        window: Sequence[int] | None = None,
        estimate: Callable[[Shape3], int] | None = None,
        share: float = 1.0,
    ) -> WindowChoice:
        """The window :meth:`predict` uses for a (Z, Y, X) volume of ``shape`` and ``dtype``: ``window`` if
        given (else ``settings.window`` where ``window_given``), otherwise the largest one whose estimated
        peak fits the budget (``settings.memory_gib`` times ``share``, :func:`memory_budget`), at most
        :attr:`stored_window` cut to the volume (each side rounded up to a multiple of 16)
        (:func:`choose_window`); the smallest candidate where none fits.

        Args:
            probabilities: class probabilities are written too (more output memory).
            estimate: bytes of peak memory as a function of the window (default :func:`peak_estimator` of
                this volume; the Dask path gives that of one block).
            share: of the budget, for one of several worker processes sharing the machine.
        """
        if window is None and self.window_given:
            window = self.settings.window
        if estimate is None:
            estimate = peak_estimator(self.bundle, self.engine, shape, dtype, probabilities)
        budget, source = memory_budget(self.settings.memory_gib, share)
        # a window beyond the volume would compute padding: cut to the volume, to the networks' multiple
        stored = tuple(
            min(w, -(-n // MULTIPLE) * MULTIPLE) for w, n in zip(self.stored_window, shape, strict=True)
        )
        fits = choose_window(stored, estimate, budget)
        if window is not None:
            chosen, how = tuple(int(w) for w in window), "given"
        elif fits is None:
            chosen, how = window_candidates(stored)[0], "the smallest"
        elif fits == self.stored_window:
            chosen, how = fits, "the model's"
        else:
            chosen, how = (
                fits,
                "the model's, cut to the volume" if fits == stored else "the largest that fits",
            )
        return WindowChoice(chosen, estimate(chosen), budget, source, how, fits)  # type: ignore[arg-type]

    def engine_for(self, window: Sequence[int]) -> SlidingWindow:
        """The engine with another window (the settings' engine where it is the same)."""
        window = tuple(int(w) for w in window)
        return self.engine if window == self.engine.window else replace(self.engine, window=window)

    @cached_property
    def digest(self) -> str:
        """:func:`meunet.models.bundle.model_digest` of the model directory (what a resumed output checks)."""
        return model_digest(self.model_dir)

    def image(self, array, path: str | os.PathLike[str] | None = None) -> Input:
        """The engine input of a raw (Z, Y, X) image (``path`` names it in a non-finite voxel's error)."""
        return image_input(array, self.normalization, path)

    def check_outputs(self, outputs: list, stats_json, inputs: list, force: bool, new_folder=None) -> None:
        """Before any work: refuse outputs that are inputs (the model directory included), given twice,
        existing without ``force`` or in a missing folder, and a ``stats_json`` not named ``.json`` (see
        :func:`meunet.io.check_outputs`; ``new_folder`` is a folder of outputs the run creates)."""
        check_outputs([*outputs, stats_json], force, inputs=[*inputs, self.model_dir], new_folder=new_folder)
        require_suffix(stats_json, ".json", "--stats-json writes JSON")

    def predict(
        self,
        input: str | os.PathLike[str],
        output: str | os.PathLike[str],
        *,
        probabilities: str | os.PathLike[str] | None = None,
        stats_json: str | os.PathLike[str] | None = None,
        progress: bool = True,
        force: bool = False,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Segment a volume file and write labels (uint8, uint16 beyond 256 classes) in the input's geometry.

        Args:
            input: image volume, any format :func:`meunet.io.open_volume` reads (read lazily, slab by slab).
            output: label volume to write (format from the suffix); written under a temporary name and
                renamed. With post-processing rules the raw labels first go to a Zarr scratch beside the
                output and are post-processed slab by slab into it, in bounded memory.
            probabilities: also write float16 class probabilities (C, Z, Y, X) to this ``.zarr``.
            stats_json: write ``voxels, seconds, voxels_per_second, peak_rss_bytes, windows,
                windows_skipped, window``.
            progress: print the window, its memory estimate and the budget, and show progress bars.
            force: overwrite existing outputs, and run even if the memory estimate exceeds the budget.
            resume: continue the partial output of an interrupted run with the same model and settings
                (formats the writers can resume, e.g. Zarr); the labels equal those of an uninterrupted run.
                Without a given window, the interrupted run's window is used again.

        Returns:
            the statistics (also written to ``stats_json``), plus ``estimated_peak_bytes``,
            ``memory_budget_bytes`` and ``postprocessing`` (the rules applied).

        Raises:
            InputError: unreadable input, existing output without ``force``, a given window whose estimate
                exceeds the budget or a budget that not even the smallest window fits (one line each).
        """
        start = time.perf_counter()
        output = Path(output)
        self.check_outputs([output, probabilities], stats_json, [input], force)
        n_classes, rules = self.n_classes, self.rules
        # raw labels to be post-processed: a fixed name, so that --resume finds them
        raw = output.parent / f".{output.name}.raw.zarr" if rules else output
        if resume and partial_run(raw) is None:
            raise InputError(output, "nothing to resume: no partial output of an interrupted run is here")
        volume = open_volume(input)
        shape = tuple(volume.array.shape)
        window = self.settings.window if self.window_given else _resumed_window(raw) if resume else None
        choice = self.window_for(shape, volume.array.dtype, probabilities is not None, window=window)
        if window is not None and not self.window_given:
            choice = replace(choice, how="resumed")
        engine = self.engine_for(choice.window)
        self.check_windows(shape, input, engine.window)
        _check_memory(input, choice, shape, force, progress)
        image = self.image(volume.array, input)
        counts = WindowCounts()
        settings = replace(self.settings, window=engine.window, memory_gib=None)
        run = {"model": self.digest, "input": str(Path(input).resolve()), "settings": asdict(settings)}
        with ExitStack() as stack:
            writers = [
                stack.enter_context(
                    create_writer(
                        raw,
                        shape,
                        label_dtype(n_classes),
                        volume,
                        force=force or bool(rules),
                        resume=resume,
                        run={**run, "rules": rules},
                    )
                )
            ]
            if probabilities is not None:
                writer = create_writer(
                    probabilities,
                    shape,
                    np.float16,
                    volume,
                    force=force,
                    resume=resume,
                    channels=n_classes,
                    run=run,
                )
                writers.append(stack.enter_context(writer))
            align = math.lcm(*(w.z_chunk for w in writers))
            start_z = _written_prefix(writers, align)
            # a fixed name, so that the next run clears what a killed run left
            scratch = output.parent / f".{output.name}.stage1.zarr"
            scores = self._stream(stack, engine, image, scratch, start_z, counts, progress)
            behind = stack.enter_context(WriteBehind(writers))  # leaves first: no writer closes under it
            for z0, slabs in _aligned(_outputs(engine, scores, probabilities is not None), align, shape[0]):
                behind.write(z0, slabs)
        if rules:
            with create_writer(output, shape, label_dtype(n_classes), volume, force=force) as writer:
                slabs = ((z, (s,)) for z, s in postprocess_slabs(open_volume(raw).array, rules))
                for z0, (slab,) in _aligned(slabs, writer.z_chunk, shape[0]):
                    writer.write(z0, slab)
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
            "window": list(engine.window),
            "estimated_peak_bytes": choice.estimate,
            "memory_budget_bytes": choice.budget,
            "postprocessing": rules,
        }
        if stats_json is not None:
            write_json(stats_json, stats)
        return stats

    def labels(self, array, counts: WindowCounts | None = None) -> np.ndarray:
        """Labels (Z, Y, X) of a raw image array (numpy, or lazy slicing to numpy) in memory, post-processed
        (a cascade's stage-1 output goes to a temporary Zarr); ``counts`` gets the windows visited."""
        out = np.empty(tuple(array.shape), label_dtype(self.n_classes))
        with ExitStack() as stack:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meunet-"))) / "stage1.zarr"
            for z0, scores in self._stream(stack, self.engine, self.image(array), scratch, 0, counts, False):
                out[z0 : z0 + scores.shape[1]] = labels_from_scores(scores)
        return apply_rules(out, self.rules) if self.rules else out

    def block(
        self, image, core: Region, counts: WindowCounts | None = None, path: str | None = None
    ) -> np.ndarray:
        """Labels of one block of a volume, identical to those :meth:`predict` gives there.

        The block runs exactly the windows the whole volume's grid places over ``core``, in the same order
        and with the same weights; a cascade's block first runs stage 1 on the windows over its stage-2
        region, so its stage-1 input is identical too. Post-processing is not applied (it needs the whole
        volume).

        Args:
            image: the whole raw (Z, Y, X) image, numpy or lazy (sliced on all three axes; only the block and
                its halo are read).
            core: ``[lo, hi)`` per axis of the block.
            counts: windows visited and skipped are added to it.
            path: names the image in the error of a NaN or infinite voxel (InputError).

        Returns:
            labels of the core, shape ``(hi - lo)`` per axis.
        """
        engine, cascade = self.engine, self.bundle.cascade
        shape = tuple(image.shape)
        grid = engine.grid(shape)
        starts, span = windows_over(grid, engine.window, core, shape)
        outer_starts, outer = (
            (starts, span) if cascade is None else windows_over(grid, engine.window, span, shape)
        )
        raw = np.asarray(image[tuple(slice(lo, hi) for lo, hi in outer)])
        inputs = [self.image(raw[within(span, outer)], path)]
        if cascade is not None:
            out = np.empty((cascade.stage1_channels, *(hi - lo for lo, hi in span)), np.float16)
            (z_lo, z_hi), rows, base = span[0], within(span, outer)[1:], outer[0][0]
            slabs = stage1_slabs(
                cascade,
                self.image(raw, path),
                engine,
                starts=_relative(outer_starts, outer),
                counts=counts,
                skip=self.skip,
            )
            for z0, slab in slabs:
                a, b = max(base + z0, z_lo), min(base + z0 + slab.shape[1], z_hi)
                if b > a:
                    out[:, a - z_lo : b - z_lo] = slab[:, a - base - z0 : b - base - z0, rows[0], rows[1]]
            inputs.append(stage1_input(out, cascade.stage1_output))
        labels = engine.labels(
            self.bundle.net,
            inputs,
            self.n_classes,
            starts=_relative(starts, span),
            counts=counts,
            **self.skip,
        )
        return labels[within(core, span)]

    def _stream(self, stack: ExitStack, engine, image: Input, scratch: Path, start_z: int, counts, progress):
        """The final stage's blended scores from ``start_z`` on (``engine``'s window); a cascade's stage 1
        first goes to ``scratch`` (removed when ``stack`` closes) over the rows that stage 2 still needs."""
        cascade = self.bundle.cascade
        inputs = [image]
        if cascade is not None and start_z < image.array.shape[0]:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            first_row = min(z for z in engine.grid(image.array.shape)[0] if z + engine.window[0] > start_z)
            stage1 = predict_stage1(cascade, image, scratch, engine, start_z=first_row, counts=counts,
                                    progress=progress, force=True, skip=self.skip)  # fmt: skip
            inputs.append(stage1_input(stage1, cascade.stage1_output))
        return engine.stream(
            self.bundle.net, inputs, self.n_classes, start_z=start_z, counts=counts, progress=progress,
            **self.skip,
        )  # fmt: skip


def predict(
    model_dir: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    overlap: float = 0.5,
    blend: str = "gaussian",
    window: Sequence[int] | None = None,
    batch: int = 1,
    device: str = "auto",
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
    memory_gib: float | None = None,
) -> dict[str, Any]:
    """Segment one volume file with a trained model directory: ``Predictor(model_dir, PredictSettings(...))
    .predict(input, output, ...)`` (see :class:`PredictSettings` for the settings and
    :meth:`Predictor.predict` for the rest). To segment several volumes, make one :class:`Predictor`.

    >>> stats = predict(model_dir, image_path, tmp / "predicted.nii.gz", skip_empty=True, progress=False)
    >>> read_volume(tmp / "predicted.nii.gz").array.shape == read_volume(image_path).array.shape
    True
    """
    settings = PredictSettings(
        window=window, overlap=overlap, blend=blend, batch=batch, device=device, precision=precision,
        skip_empty=skip_empty, air_threshold=air_threshold, tta=tta, postprocess=postprocess,
        memory_gib=memory_gib,
    )  # fmt: skip
    return Predictor(model_dir, settings).predict(
        input, output, probabilities=probabilities, stats_json=stats_json, progress=progress, force=force,
        resume=resume,
    )  # fmt: skip


def _check_memory(input, choice: WindowChoice, shape: Sequence[int], force: bool, progress: bool) -> None:
    """Print the window and its estimate (when ``progress``); InputError (one line) if the estimate exceeds
    the budget, unless ``force``."""
    if progress:
        print(f"meunet predict: {choice.line(shape)}", file=sys.stderr)
    refusal = choice.refusal()
    if refusal is not None and not force:
        raise InputError(input, refusal)


def _resumed_window(output: Path) -> tuple[int, ...] | None:
    """The window of the interrupted run whose partial output ``output`` has, if any."""
    run = partial_run(output)
    window = ((run or {}).get("settings") or {}).get("window")
    return tuple(int(w) for w in window) if isinstance(window, list) and len(window) == 3 else None


def _skip_settings(normalization: Normalization, n_classes: int, air_threshold: float | None) -> dict:
    """:meth:`SlidingWindow.stream` arguments that skip air windows: the threshold (default one third of the
    way from ``clip_low`` to ``clip_high``) and background-certain logits."""
    low, high = normalization.clip_low, normalization.clip_high
    threshold = low + (high - low) / 3 if air_threshold is None else air_threshold
    return {"skip_below": threshold, "skip_logits": [0.0] + [-SKIP_MARGIN] * (n_classes - 1)}


def _relative(starts: Sequence[Sequence[int]], span: Region) -> list[list[int]]:
    """Window starts made relative to the array that holds ``span``."""
    return [[s - lo for s in axis] for axis, (lo, _) in zip(starts, span, strict=True)]


# -- the cascade's stage-1 input ----------------------------------------------------------------------------
def image_input(array, normalization: Normalization, path: str | os.PathLike[str] | None = None) -> Input:
    """The engine input of a raw (Z, Y, X) image: raw zeros past the border, then normalisation (as training
    pads its patches); a NaN or infinite voxel stops the stream with an InputError naming ``path`` (default
    ``image``)."""
    return Input(array, normalization.apply, 0.0, "image" if path is None else str(path))


def stage1_input(array, stage1_output: str = "probs") -> Input:
    """The engine input of a cascade's (C, Z, Y, X) stage-1 output (cached, or computed for a block), padded
    past the border as training pads it (:func:`meunet.models.stage1_fill`)."""
    return Input(array, None, stage1_fill(array.shape[0], stage1_output))


def stage1_slabs(
    cascade,
    image: Input,
    engine: SlidingWindow,
    *,
    start_z: int = 0,
    starts: Sequence[Sequence[int]] | None = None,
    counts: WindowCounts | None = None,
    progress: bool = False,
    skip: dict[str, Any] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """A cascade's stage-1 output as stage 2 consumes it, slab by slab: float16 (C, dz, Y, X).

    With ``cascade.stage1_output == "probs"`` the blended stage-1 logits become softmax probabilities (and
    ``skip``, :meth:`SlidingWindow.stream`'s ``skip_below`` / ``skip_logits``, applies); with
    ``"features"`` the blended last-decoder features are given as they are (every window runs).
    ``start_z``, ``starts``, ``counts``, ``progress``: passed to :meth:`SlidingWindow.stream`.
    """
    probs = cascade.stage1_output == "probs"
    net = cascade.stage1 if probs else cascade.stage1.features
    stream = engine.stream(
        net, [image], cascade.stage1_channels, start_z=start_z, starts=starts, counts=counts,
        progress=progress, **((skip or {}) if probs else {}),
    )  # fmt: skip
    for z0, scores in stream:
        yield z0, (engine.probabilities_(scores) if probs else scores).astype(np.float16)


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
    skip: dict[str, Any] | None = None,
) -> zarr.Array:
    """A cascade's stage-1 output of a whole volume (:func:`stage1_slabs`) written to a float16 Zarr, for
    cascade prediction and for the stage-1 caches that stage 2 trains on.

    Args:
        cascade: a :class:`meunet.models.Cascade` (its ``stage1`` and ``stage1_output`` are used), eval mode.
        image: the normalised image input (:func:`image_input`).
        output: ``.zarr`` path of the (stage1_channels, Z, Y, X) float16 array.
        engine: window settings.
        start_z: compute only z >= start_z (the rest of the array stays zero).
        counts, progress, skip: passed to :func:`stage1_slabs`.
        force: overwrite an existing ``output``.

    Returns:
        the written array, opened read-only.
    """
    shape = tuple(image.array.shape[-3:])
    slabs = stage1_slabs(cascade, image, engine, start_z=start_z, counts=counts, progress=progress, skip=skip)
    channels = cascade.stage1_channels
    with create_writer(output, shape, np.float16, force=force, channels=channels) as writer:
        with WriteBehind([writer]) as behind:
            for z0, pieces in _aligned(((z0, (s,)) for z0, s in slabs), writer.z_chunk, shape[0]):
                behind.write(z0, pieces)
    return zarr.open_array(output, mode="r")


def estimate_peak_bytes(bundle, engine: SlidingWindow, volume: Volume, probabilities: bool) -> int:
    """Estimated peak resident memory of :func:`predict` with ``engine``'s window, in bytes
    (:func:`peak_estimator`)."""
    return peak_estimator(bundle, engine, volume.array.shape, volume.array.dtype, probabilities)(
        engine.window
    )


def peak_estimator(
    bundle, engine: SlidingWindow, shape: Sequence[int], dtype, probabilities: bool
) -> Callable[[Shape3], int]:
    """The estimated peak resident memory (bytes) of predicting a (Z, Y, X) volume of ``shape`` and ``dtype``
    with ``engine``'s settings, as a function of the window: :func:`peak_bytes` with this process's
    resident memory now (interpreter, torch, model weights) and the model's widths."""
    stage1_channels = 0 if bundle.cascade is None else bundle.cascade.stage1_channels
    widths = [bundle.meta["stage1"]["widths"][0]]
    if bundle.cascade is not None:
        widths.append(bundle.meta["stage2"]["widths"][0] + stage1_channels)
    return partial(
        peak_bytes,
        resident=psutil.Process().memory_info().rss,
        shape=tuple(int(n) for n in shape),
        itemsize=np.dtype(dtype).itemsize,
        n_classes=len(bundle.classes),
        stage1_channels=stage1_channels,
        width=max(widths),
        batch=engine.batch,
        precision=engine.precision,
        device=engine.device,
        probabilities=probabilities,
    )


def peak_bytes(
    window: Sequence[int],
    *,
    resident: int,
    shape: Sequence[int],
    itemsize: int,
    n_classes: int,
    stage1_channels: int,
    width: int,
    batch: int,
    precision: str,
    device: str,
    probabilities: bool,
) -> int:
    """Estimated peak resident memory of a prediction, in bytes: the sum of

    - ``resident`` (the process before it starts) plus the precision's ``runtime`` bytes
      (:data:`ACTIVATIONS`);
    - the engine's accumulators (classes + 1 float32 maps of ``window_z x Y x X``, Y and X padded up to the
      window) and raw input slabs (``itemsize``, plus float16 stage-1 output for a cascade), twice (the
      slabs of the next row are read ahead);
    - one batch of input windows (float32) and the window's importance map (the outputs come when the
      activations have gone);
    - on the CPU, the network's activations: the precision's ``maps`` maps (:data:`ACTIVATIONS`) of the top
      level's ``width`` in its bytes plus ``voxel`` bytes, per window voxel padded to a multiple of 16
      (measured: benchmarks/predict_memory.py, docs/inference.md). On another device they are the device's
      memory, not counted here;
    - the output slabs (uint8 labels, float32 scores, float16 probabilities) of one window depth plus one
      chunk, three times (the writers copy, and one piece is written behind while the next is computed).
    """
    wz, wy, wx = (int(w) for w in window)
    y, x = (max(s, w) for s, w in zip(shape[1:], (wy, wx), strict=True))
    plane = y * x
    padded = math.prod(-(-int(w) // MULTIPLE) * MULTIPLE for w in window)
    accumulators = (max(n_classes, stage1_channels) + 1) * wz * plane * 4
    input_slabs = 2 * wz * plane * (itemsize + 2 * stage1_channels)
    batch_bytes = wz * wy * wx * 4 * (batch * (1 + stage1_channels) + 1)  # inputs, the importance map
    fit = ACTIVATIONS[precision]
    per_voxel = fit["maps"] * width * PRECISION_BYTES[precision] + fit["voxel"]
    activations = batch * padded * per_voxel if str(device).startswith("cpu") else 0
    outputs = 3 * (wz + 64) * plane * (1 + (2 * n_classes + 8 if probabilities or stage1_channels else 0))
    total = resident + fit["runtime"] + accumulators + input_slabs + batch_bytes + activations + outputs
    return int(total)


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
