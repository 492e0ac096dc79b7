"""Prediction over a Dask cluster: volumes cut into output-chunk-aligned blocks, one task per block.

This module only orchestrates: it plans the blocks, submits one task per block and collects them. Each
worker builds one :class:`meunet.infer.Predictor` from the run's settings, and a task is
:meth:`meunet.infer.Predictor.block`: the block's core plus the halo its windows need, run on exactly the
windows the whole volume's grid places over the core, in the same order and with the same weights, so every
voxel is the same sum of the same terms as in single-process prediction (:func:`meunet.infer.predict`): the
labels are bit for bit identical. A cascade's block first runs stage 1 on the windows over its stage-2
region, so its stage-1 input is identical too.

A task writes its core into the output OME-Zarr (whole chunks, so no locks) and then an empty completion
marker; a task that a dying worker loses is simply run again by Dask, and a run resumed after the client died
submits only the blocks without a marker. The output is an OME-Zarr labels image with a multiscale pyramid
(:func:`meunet.io.add_label_pyramid`). Workers need the model directory, the input and the output on a
shared file system, under the same paths as the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from meunet.allocator import allocator_tunables
from meunet.errors import InputError
from meunet.infer import Predictor, PredictSettings, WindowCounts, peak_estimator
from meunet.infer.postprocess import SLAB_VOXELS, postprocess_slabs
from meunet.infer.window import Region, label_dtype
from meunet.io import (
    PYRAMID_LEVELS,
    add_label_pyramid,
    create_writer,
    ome_levels,
    open_volume,
    volume_format,
    volume_pairs,
    write_json,
    write_volume,
)
from meunet.io._writer import partial_folder
from meunet.io._zarr import DEFAULT_CHUNKS
from meunet.models.bundle import model_digest, model_files

DIRECT_FORMATS = ("zarr", "ome-zarr", "npy")  # read block by block in place; other inputs are converted
# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold at 128 KiB:
# every activation of the network is then mmap-ed and unmapped, and prediction runs ~1.7x slower (measured).
# local:N workers start without it and with meunet.allocator.allocator_tunables().
PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
SCRATCH = "meunet-blocks"  # inside the output writer's partial folder: markers, settings, converted input


# -- geometry ---------------------------------------------------------------------------------------------
def plan_blocks(shape: Sequence[int], block: Sequence[int]) -> list[Region]:
    """The cores of the blocks tiling a (Z, Y, X) volume, in C order: ``[lo, hi)`` per axis, each ``block``
    long except the last along an axis."""
    axes = [[(lo, min(lo + b, n)) for lo in range(0, n, b)] for n, b in zip(shape, block, strict=True)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def _slices(region: Region) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in region)  # type: ignore[return-value]


# -- tasks ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Job:
    """What every block task of one volume needs (absolute paths, valid on every worker)."""

    model_dir: str
    image: str
    source: str  # the input as the user named it (image may be a Zarr copy of it), for error messages
    labels: str  # the level-0 array of the output being written
    markers: str
    settings: PredictSettings  # window filled in from model.json


@lru_cache(maxsize=2)
def _cached_predictor(model_dir: str, settings: PredictSettings, stamp: tuple) -> Predictor:
    return Predictor(model_dir, settings)


def _predictor(job: _Job) -> Predictor:
    """The job's predictor, built once per worker process (again when the model's files change)."""
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in model_files(job.model_dir))
    return _cached_predictor(job.model_dir, job.settings, stamp)


def _marker(job: _Job, core: Region) -> Path:
    return Path(job.markers) / "_".join(f"{lo}-{hi}" for lo, hi in core)


def _run_block(job: _Job, core: Region) -> tuple[int, int]:
    """Task: predict one block (:meth:`meunet.infer.Predictor.block`), write its core into the output and
    then its completion marker.

    Returns (windows visited, windows skipped)."""
    import zarr

    counts = WindowCounts()
    labels = _predictor(job).block(open_volume(job.image).array, core, counts, path=job.source)
    zarr.open_array(job.labels, mode="r+")[_slices(core)] = labels
    _marker(job, core).touch()
    return counts.windows, counts.skipped


# -- client -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def connect(scheduler: str) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``scheduler``, closed on exit.

    Args:
        scheduler: the address of a running scheduler (``tcp://host:8786``), or ``local:N`` to start a
            ``LocalCluster`` of N single-threaded worker processes on the loopback interface for the
            duration of the ``with`` block.

    Raises:
        InputError: ``local:N`` with N not a positive integer, or a scheduler that cannot be reached.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        count = scheduler.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise InputError(scheduler, "use local:N with N >= 1 worker processes, or a scheduler address")
        with (
            dask.config.set(
                {
                    f"{PRE_SPAWN_ENVIRON}.MALLOC_TRIM_THRESHOLD_": None,
                    f"{PRE_SPAWN_ENVIRON}.GLIBC_TUNABLES": allocator_tunables(),
                }
            ),
            LocalCluster(
                n_workers=int(count),
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(scheduler, f"cannot reach the Dask scheduler ({exc})") from None
    with client:
        yield client


def default_block(shape: Sequence[int], chunks: Sequence[int], window: Sequence[int]) -> tuple[int, int, int]:
    """Block core per axis: the smallest multiple of the chunk that is at least ``max(256, 2 * window)``
    (recomputed halo windows then cost at most ~25 % per blocked axis), clipped to the volume."""
    return tuple(
        min(-(-max(256, 2 * w) // c) * c, -(-n // c) * c)
        for n, c, w in zip(shape, chunks, window, strict=True)
    )  # type: ignore[return-value]


def predict_distributed(
    model_dir: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    scheduler,
    settings: PredictSettings = PredictSettings(),
    *,
    chunks: Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    pyramid_levels: int = PYRAMID_LEVELS,
    stats_json: str | os.PathLike[str] | None = None,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Segment a volume, or a folder of volumes, on a Dask cluster into OME-Zarr labels with a pyramid.

    The labels (level ``0``, uint8 (Z, Y, X), the input's geometry) equal those of
    :func:`meunet.infer.predict` with the same settings. The blocks of all volumes are submitted at once,
    so volumes and blocks spread over the cluster together; progress is shown from the client.

    Args:
        model_dir: model directory, readable by every worker.
        input: a volume in any format :func:`meunet.io.open_volume` reads (Zarr, OME-Zarr and .npy are read
            in place by the workers, others are first converted to a Zarr beside the output), or a folder of
            volumes (see :func:`meunet.io.volume_pairs`).
        output: a path ending in ``.zarr`` for one volume; the output folder for a folder of volumes.
        scheduler: a ``dask.distributed.Client``, or a scheduler address or ``local:N`` (see :func:`connect`).
        settings: as for :class:`meunet.infer.Predictor` (``device`` is the workers'; the client checks
            the model directory and the settings on the CPU, each worker builds one predictor). Without a
            ``window``, each volume's is chosen as :func:`_window` says (``memory_gib`` is each worker's).
        chunks: (z, y, x) chunk shape of the output (default 64^3, clipped to the volume).
        block: (z, y, x) block core, a multiple of ``chunks`` (default :func:`default_block`).
        pyramid_levels: levels 1.. of the multiscale pyramid, each half the size of the one before.
        stats_json: write the returned list here.
        progress: show a progress bar over blocks.
        force: overwrite existing outputs.
        resume: continue the partial outputs of an interrupted run with the same model and settings: blocks
            with a completion marker are not computed again.

    Returns:
        per volume: ``input``, ``output``, ``shape``, ``blocks``, ``blocks_reused`` (done by an earlier run),
        ``windows``, ``windows_skipped``, ``seconds`` (the whole run's).

    Raises:
        InputError: bad model directory, input or scheduler, an output not ending in ``.zarr``, an existing
            output without ``force``, or a partial output made with other settings.
    """
    start = time.perf_counter()
    model_dir = Path(model_dir).resolve()
    checked = Predictor(model_dir, dataclasses.replace(settings, device="cpu"))  # workers load it on theirs
    settings = dataclasses.replace(checked.settings, device=settings.device, memory_gib=None)
    n_classes = len(checked.bundle.classes)
    pairs = volume_pairs(input, output)
    for _, target in pairs:
        if not target.name.endswith(".zarr"):
            raise InputError(target, "distributed prediction writes OME-Zarr: give an output ending in .zarr")
    checked.check_outputs([o for _, o in pairs], stats_json, [i for i, _ in pairs], force, new_folder=output)
    volumes = [open_volume(i) for i, _ in pairs]
    windows = [
        _window(checked, volume, target, chunks, block, scheduler, resume, force) for (_, target), volume
        in zip(pairs, volumes, strict=True)
    ]  # fmt: skip
    for (source, _), volume, window in zip(pairs, volumes, windows, strict=True):
        checked.check_windows(volume.array.shape, source, window)
    if pairs != [(Path(input), Path(output))]:
        Path(output).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(connect(scheduler)) if isinstance(scheduler, str) else scheduler
        writers, stats, futures = [], [], {}
        for (source, target), volume, window in zip(pairs, volumes, windows, strict=True):
            writer = stack.enter_context(
                create_writer(
                    target,
                    volume.array.shape,
                    label_dtype(n_classes),
                    volume,
                    chunks,
                    force=force,
                    resume=resume,
                )
            )
            job, todo, volume_stats = _prepare(
                writer,
                model_dir,
                source,
                volume,
                dataclasses.replace(settings, window=window),
                block,
                progress,
            )
            writers.append(writer)
            stats.append(volume_stats)
            for core in todo:
                key = f"meunet-block-{target.name}-{_marker(job, core).name}-{os.urandom(4).hex()}"
                futures[client.submit(_run_block, job, core, key=key, pure=False)] = volume_stats
        _gather(client, futures, progress)
        for writer in writers:
            if checked.rules:
                _postprocess_in_place(writer.target, checked.rules)
            add_label_pyramid(writer.target, pyramid_levels, checked.bundle.classes)
            shutil.rmtree(writer.partial / SCRATCH)
    for s in stats:
        s["seconds"] = time.perf_counter() - start
    if stats_json is not None:
        write_json(stats_json, stats)
    return stats


def _local_workers(scheduler) -> int | None:
    """N of a ``local:N`` scheduler (workers on this machine), else None."""
    if isinstance(scheduler, str) and scheduler.startswith("local:"):
        count = scheduler.removeprefix("local:")
        return int(count) if count.isdigit() and int(count) > 0 else None
    return None


def _window(checked: Predictor, volume, target: Path, chunks, block, scheduler, resume: bool, force: bool):
    """The window of one volume's blocks.

    The given one (``--window``), else on ``resume`` the interrupted run's. Where the budget is known
    (``--memory-gib``, each worker's; or ``local:N``, :data:`meunet.infer.predict.MEMORY_MARGIN` of this
    machine's available memory shared by the N workers) a window not given is the largest whose estimated
    peak for one block (:func:`block_peak_bytes`) fits, at most the model's (:meth:`Predictor.window_for`),
    and
    one given above the budget is refused with one line (unless ``force``). For a remote cluster without
    ``--memory-gib`` the client cannot see the workers' memory: the model's window.
    """
    given = checked.settings.window if checked.window_given else None
    if given is None and resume:
        recorded = _read_json(partial_folder(target) / SCRATCH / "settings.json")
        given = ((recorded or {}).get("settings") or {}).get("window")
    workers = _local_workers(scheduler)
    if checked.settings.memory_gib is None and workers is None:
        return tuple(given or checked.settings.window)
    shape = tuple(volume.array.shape)
    estimate = partial(block_peak_bytes, checked, shape, volume.array.dtype, _chunks(shape, chunks), block)
    share = 1.0 if checked.settings.memory_gib is not None else 1 / workers
    choice = checked.window_for(shape, volume.array.dtype, window=given, estimate=estimate, share=share)
    refusal = choice.refusal()
    if refusal is not None and not force:
        raise InputError(target, f"one block of {choice.window} windows: {refusal}")
    return choice.window


def _chunks(shape: Sequence[int], chunks: Sequence[int] | None) -> tuple[int, int, int]:
    """The output's chunks, as its writer makes them."""
    return tuple(min(c, n) for c, n in zip(chunks or DEFAULT_CHUNKS, shape, strict=True))  # type: ignore[return-value]


def block_peak_bytes(checked: Predictor, shape, dtype, chunks, block, window) -> int:
    """Estimated peak memory of one worker predicting the largest block of a (Z, Y, X) volume of ``shape``
    with ``window``: :func:`meunet.infer.predict.peak_bytes` over the block's span (the core and the windows
    that reach into it: up to a window beyond the core on each side), plus the span's raw input, its labels
    and, for a cascade, its float16 stage-1 output and the wider raw input stage 1 reads (a window more)."""
    core = _checked_block(block, chunks, shape, window)
    span = [min(n, b + 2 * w) for n, b, w in zip(shape, core, window, strict=True)]
    itemsize = np.dtype(dtype).itemsize
    extra = math.prod(span) * (itemsize + 1)
    cascade = checked.bundle.cascade
    if cascade is not None:
        outer = [min(n, s + 2 * w) for n, s, w in zip(shape, span, window, strict=True)]
        extra += math.prod(span) * 2 * cascade.stage1_channels + math.prod(outer) * itemsize
    return peak_estimator(checked.bundle, checked.engine, span, dtype, False)(window) + extra


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _prepare(writer, model_dir: Path, source: Path, volume, settings: PredictSettings, block, progress):
    """Markers, settings check and (if needed) a Zarr copy of the input for one volume; returns its job,
    the blocks still to compute and its statistics."""
    scratch = writer.partial / SCRATCH
    (scratch / "done").mkdir(parents=True, exist_ok=True)
    shape = writer.shape
    cores = plan_blocks(shape, _checked_block(block, writer.array.chunks, shape, settings.window))
    run = {
        "model": model_digest(model_dir),
        "input": str(source.resolve()),
        "settings": dataclasses.asdict(settings),
        "block": cores[0],
    }
    _check_settings(scratch / "settings.json", run, writer.path)
    image = source.resolve()
    if volume_format(source) not in DIRECT_FORMATS:
        image = scratch / "input.zarr"
        if not image.exists():
            write_volume(image, volume, chunks=writer.array.chunks, progress=progress)
    labels = writer.target.resolve() / "0"
    job = _Job(
        str(model_dir), str(image), str(source), str(labels), str(scratch.resolve() / "done"), settings
    )
    todo = [c for c in cores if not _marker(job, c).exists()]
    stats = {
        "input": str(source),
        "output": str(writer.path),
        "shape": list(shape),
        "blocks": len(cores),
        "blocks_reused": len(cores) - len(todo),
        "windows": 0,
        "windows_skipped": 0,
    }
    return job, todo, stats


def _gather(client, futures: dict, progress: bool) -> None:
    """Wait for the block tasks, adding their window counts to their volume's statistics; on any error
    (or interrupt) the remaining tasks are cancelled."""
    from distributed import as_completed
    from tqdm import tqdm

    try:
        with tqdm(total=len(futures), unit="block", disable=not progress, desc="blocks") as bar:
            for future in as_completed(futures):
                windows, skipped = future.result()
                futures[future]["windows"] += windows
                futures[future]["windows_skipped"] += skipped
                bar.update()
    finally:
        client.cancel(list(futures))


def _checked_block(block, chunks, shape, window) -> tuple[int, int, int]:
    block = tuple(block) if block is not None else default_block(shape, chunks, window)
    if len(block) != 3 or any(
        b < 1 or (b % c and b < n) for b, c, n in zip(block, chunks, shape, strict=True)
    ):
        raise ValueError(f"block {block} must be three positive multiples of the output chunks {chunks}")
    return block  # type: ignore[return-value]


def _check_settings(path: Path, settings: dict, output: Path) -> None:
    """Record the run's settings beside its markers; a resumed run must have the same."""
    settings = json.loads(json.dumps(settings))
    if path.exists():
        if json.loads(path.read_text()) != settings:
            raise InputError(
                output,
                "the partial output was made with another model, input or settings; run without --resume",
            )
        return
    path.write_text(json.dumps(settings))


def _postprocess_in_place(path: Path, rules: dict) -> None:
    """Apply post-processing rules to level 0 of an OME-Zarr labels image, slab by slab on the client, in
    place (each slab is read before it is written, and the second pass reads only its own slab), so the
    labels equal those of single-process prediction."""
    level0 = ome_levels(path, mode="r+")[0]
    depth = level0.chunks[0] * max(1, SLAB_VOXELS // (level0.chunks[0] * level0.shape[1] * level0.shape[2]))
    for z0, slab in postprocess_slabs(level0, rules, depth):
        level0[z0 : z0 + len(slab)] = slab
