"""Prediction over a Dask cluster: volumes cut into output-chunk-aligned blocks, one task per block.

Every block reads its core plus the halo its windows need and runs the streaming engine
(:class:`meunet.infer.SlidingWindow`) on exactly the windows the whole volume's grid places over the core, in
the same order and with the same weights, so every voxel is the same sum of the same terms as in
single-process prediction (:func:`meunet.infer.predict`): the labels are bit for bit identical. A cascade's
block first runs stage 1 on the windows over its stage-2 region, so its stage-1 input is identical too.

A task writes its core into the output OME-Zarr (whole chunks, so no locks) and then an empty completion
marker; a task that a dying worker loses is simply run again by Dask, and a run resumed after the client died
submits only the blocks without a marker. The output is an OME-Zarr labels image with a multiscale pyramid
(:func:`add_label_pyramid`). Workers need the model directory, the input and the output on a shared file
system, under the same paths as the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from meunet import allocator_tunables
from meunet.errors import InputError
from meunet.infer.postprocess import SLAB_VOXELS, postprocess_slabs
from meunet.infer.window import Input, SlidingWindow, WindowCounts, label_dtype
from meunet.io import check_new_output

Region = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [lo, hi) per axis (z, y, x)

DIRECT_FORMATS = ("zarr", "ome-zarr", "npy")  # read block by block in place; other inputs are converted
PYRAMID_LEVELS = 3
# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold at 128 KiB:
# every activation of the network is then mmap-ed and unmapped, and prediction runs ~1.7x slower (measured).
# local:N workers start without it and with meunet.allocator_tunables().
PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
SCRATCH = "meunet-blocks"  # inside the output writer's partial folder: markers, settings, converted input


# -- geometry ---------------------------------------------------------------------------------------------
def plan_blocks(shape: Sequence[int], block: Sequence[int]) -> list[Region]:
    """The cores of the blocks tiling a (Z, Y, X) volume, in C order: ``[lo, hi)`` per axis, each ``block``
    long except the last along an axis."""
    axes = [[(lo, min(lo + b, n)) for lo in range(0, n, b)] for n, b in zip(shape, block, strict=True)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


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


def _within(inner: Region, outer: Region) -> tuple[slice, slice, slice]:
    """Slices selecting ``inner`` from an array that holds ``outer``."""
    return tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inner, outer, strict=True))  # type: ignore[return-value]


def _slices(region: Region) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in region)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class _GridWindow(SlidingWindow):
    """The engine on given window starts (relative to the array it is run on) instead of its own evenly
    spread grid: a block runs exactly the windows the whole volume's grid places over it."""

    starts: tuple[tuple[int, ...], ...] = ()

    def grid(self, shape):
        return [list(s) for s in self.starts]


def _settings(engine: SlidingWindow) -> dict[str, Any]:
    """The engine's constructor arguments (not its weight map, which can be many MB)."""
    return {f.name: getattr(engine, f.name) for f in dataclasses.fields(SlidingWindow) if f.init}


def _on_windows(engine: SlidingWindow, starts: Sequence[Sequence[int]], span: Region) -> _GridWindow:
    settings = _settings(engine)
    local = tuple(tuple(s - lo for s in axis) for axis, (lo, _) in zip(starts, span, strict=True))
    return _GridWindow(**settings, starts=local)


# -- one block --------------------------------------------------------------------------------------------
def predict_block(
    bundle,
    image,
    engine: SlidingWindow,
    core: Region,
    skip: dict[str, Any] | None = None,
    counts: WindowCounts | None = None,
) -> np.ndarray:
    """Labels of one block, identical to those single-process prediction gives there.

    Args:
        bundle: a loaded model directory (:func:`meunet.models.load_model_dir`).
        image: the whole (Z, Y, X) image, numpy or lazy (sliced on all three axes; only the block and its
            halo are read).
        engine: the prediction settings (window, overlap, blend, ...).
        core: ``[lo, hi)`` per axis of the block.
        skip: ``skip_below`` and ``skip_logits`` for skipping empty windows, as :func:`meunet.infer.predict`
            computes them; None runs every window.
        counts: windows visited and skipped are added to it.

    Returns:
        uint8 labels of the core, shape ``(hi - lo)`` per axis.
    """
    from meunet.data.normalization import Normalization

    skip = skip or {}
    shape = tuple(image.shape)
    grid = engine.grid(shape)
    starts, span = windows_over(grid, engine.window, core, shape)
    outer_starts, outer = (
        (starts, span) if bundle.stage2 is None else windows_over(grid, engine.window, span, shape)
    )
    normalization = Normalization.from_dict(bundle.meta["normalization"])
    raw = np.asarray(image[_slices(outer)])
    inputs = [Input(raw[_within(span, outer)], normalization.apply)]
    if bundle.stage2 is not None:
        stage1_engine = _on_windows(engine, outer_starts, outer)
        image = Input(raw, normalization.apply)
        inputs.append(_stage1_input(bundle.stage2, image, stage1_engine, span, outer, skip, counts))
    labels = _on_windows(engine, starts, span).labels(
        bundle.net, inputs, len(bundle.classes), counts=counts, **skip
    )
    return labels[_within(core, span)]


def _stage1_input(cascade, image: Input, engine, span: Region, outer: Region, skip, counts) -> Input:
    """A cascade's stage-1 output over ``span`` from the image over ``outer``, as stage 2's second input:
    float16 (C, *span), the values :func:`meunet.infer.predict_stage1` gives the whole volume there, padded
    as training pads it (certain background for probabilities, zeros for features)."""
    probs = cascade.stage1_output == "probs"
    net = cascade.stage1 if probs else cascade.stage1.features
    channels = cascade.stage1_channels
    out = np.empty((channels, *(hi - lo for lo, hi in span)), np.float16)
    (z_lo, z_hi), rows = span[0], _within(span, outer)[1:]
    base = outer[0][0]
    for z0, scores in engine.stream(net, [image], channels, counts=counts, **(skip if probs else {})):
        a, b = max(base + z0, z_lo), min(base + z0 + scores.shape[1], z_hi)
        if b > a:
            slab = engine.probabilities_(scores) if probs else scores
            out[:, a - z_lo : b - z_lo] = slab[:, a - base - z0 : b - base - z0, rows[0], rows[1]]
    return Input(out, fill=(1.0,) + (0.0,) * (channels - 1) if probs else (0.0,))


# -- tasks ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Job:
    """What every block task of one volume needs (absolute paths, valid on every worker)."""

    model_dir: str
    image: str
    labels: str  # the level-0 array of the output being written
    markers: str
    engine: dict[str, Any]  # SlidingWindow arguments
    skip: dict[str, Any]


@lru_cache(maxsize=2)
def _cached_model(model_dir: str, device: str, stamp: tuple):
    from meunet.models import load_model_dir

    return load_model_dir(model_dir, device)


def _model(model_dir: str, device: str):
    """The model directory, loaded once per worker process (reloaded when its files change)."""
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in _model_files(Path(model_dir)))
    return _cached_model(model_dir, device, stamp)


def _marker(job: _Job, core: Region) -> Path:
    return Path(job.markers) / "_".join(f"{lo}-{hi}" for lo, hi in core)


def _run_block(job: _Job, core: Region) -> tuple[int, int]:
    """Task: predict one block, write its core into the output and then its completion marker.

    Returns (windows visited, windows skipped)."""
    import zarr

    from meunet.io import open_volume

    counts = WindowCounts()
    bundle = _model(job.model_dir, job.engine["device"])
    engine = SlidingWindow(**job.engine)
    labels = predict_block(bundle, open_volume(job.image).array, engine, core, job.skip, counts)
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
    chunks: Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    pyramid_levels: int = PYRAMID_LEVELS,
    stats_json: str | os.PathLike[str] | None = None,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
    postprocess: bool = True,
) -> list[dict[str, Any]]:
    """Segment a volume, or a folder of volumes, on a Dask cluster into OME-Zarr labels with a pyramid.

    The labels (level ``0``, uint8 (Z, Y, X), the input's geometry) equal those of
    :func:`meunet.infer.predict` with the same settings. The blocks of all volumes are submitted at once,
    so volumes and blocks spread over the cluster together; progress is shown from the client.

    Args:
        model_dir: model directory, readable by every worker.
        input: a volume in any format :func:`meunet.io.open_volume` reads (Zarr, OME-Zarr and .npy are read
            in place by the workers, others are first converted to a Zarr beside the output), or a folder of
            volumes (see :func:`volume_pairs`).
        output: a path ending in ``.zarr`` for one volume; the output folder for a folder of volumes.
        scheduler: a ``dask.distributed.Client``, or a scheduler address or ``local:N`` (see :func:`connect`).
        overlap, blend, window, batch, device, precision, skip_empty, air_threshold, tta: as
            :func:`meunet.infer.predict` (``device`` is the workers').
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
    from meunet.data.normalization import Normalization
    from meunet.infer.predict import _skip_settings, _write_json
    from meunet.io import create_writer, open_volume
    from meunet.models import load_model_dir

    start = time.perf_counter()
    model_dir = Path(model_dir).resolve()
    bundle = load_model_dir(model_dir)
    if bundle.meta["in_channels"] != 1:
        raise InputError(model_dir, f"the model expects {bundle.meta['in_channels']} input channels, not 1")
    try:
        engine = SlidingWindow(
            tuple(window or bundle.meta["window"]), overlap, blend, batch, device, precision, tta
        )
    except ValueError as exc:
        raise InputError(model_dir, f"bad prediction settings: {exc}") from None
    normalization = Normalization.from_dict(bundle.meta["normalization"])
    skip = _skip_settings(normalization, len(bundle.classes), air_threshold) if skip_empty else {}
    pairs = volume_pairs(input, output)
    for _, target in pairs:
        if not target.name.endswith(".zarr"):
            raise InputError(target, "distributed prediction writes OME-Zarr: give an output ending in .zarr")
    for path in [o for _, o in pairs] + ([] if stats_json is None else [Path(stats_json)]):
        check_new_output(path, force)
    volumes = [open_volume(i) for i, _ in pairs]
    if pairs != [(Path(input), Path(output))]:
        Path(output).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(connect(scheduler)) if isinstance(scheduler, str) else scheduler
        writers, stats, futures = [], [], {}
        for (source, target), volume in zip(pairs, volumes, strict=True):
            writer = stack.enter_context(
                create_writer(
                    target,
                    volume.array.shape,
                    label_dtype(len(bundle.classes)),
                    volume,
                    chunks,
                    force=force,
                    resume=resume,
                )
            )
            job, todo, volume_stats = _prepare(
                writer, model_dir, source, volume, engine, skip, block, progress
            )
            writers.append(writer)
            stats.append(volume_stats)
            for core in todo:
                key = f"meunet-block-{target.name}-{_marker(job, core).name}-{os.urandom(4).hex()}"
                futures[client.submit(_run_block, job, core, key=key, pure=False)] = volume_stats
        _gather(client, futures, progress)
        rules = (bundle.meta.get("postprocessing") or {}) if postprocess else {}
        for writer in writers:
            if rules:
                _postprocess_in_place(writer.target, rules)
            add_label_pyramid(writer.target, pyramid_levels, bundle.classes)
            shutil.rmtree(writer.partial / SCRATCH)
    for s in stats:
        s["seconds"] = time.perf_counter() - start
    if stats_json is not None:
        _write_json(Path(stats_json), stats)
    return stats


def _prepare(writer, model_dir: Path, source: Path, volume, engine, skip, block, progress):
    """Markers, settings check and (if needed) a Zarr copy of the input for one volume; returns its job,
    the blocks still to compute and its statistics."""
    from meunet.io import volume_format, write_volume

    scratch = writer.partial / SCRATCH
    (scratch / "done").mkdir(parents=True, exist_ok=True)
    shape = writer.shape
    cores = plan_blocks(shape, _checked_block(block, writer.array.chunks, shape, engine.window))
    settings = {
        "model": _fingerprint(model_dir),
        "input": str(source.resolve()),
        "engine": repr(engine),
        "skip": skip,
        "block": cores[0],
    }
    _check_settings(scratch / "settings.json", settings, writer.path)
    image = source.resolve()
    if volume_format(source) not in DIRECT_FORMATS:
        image = scratch / "input.zarr"
        if not image.exists():
            write_volume(image, volume, chunks=writer.array.chunks, progress=progress)
    labels = writer.target.resolve() / "0"
    job = _Job(
        str(model_dir), str(image), str(labels), str(scratch.resolve() / "done"), _settings(engine), skip
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


def _model_files(model_dir: Path) -> list[Path]:
    return [*sorted(model_dir.glob("*.pt")), model_dir / "model.json"]


def _fingerprint(model_dir: Path) -> str:
    """Digest of a model directory's weights and model.json."""
    digest = hashlib.sha256()
    for file in _model_files(model_dir):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


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


# -- OME-Zarr labels pyramid ------------------------------------------------------------------------------
def downsample_mode(labels: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2 x 2 x 2 cell (ties go to the smaller label).

    Args:
        labels: uint8 (Z, Y, X); an odd trailing cell holds the voxels that exist.

    Returns:
        uint8 (ceil(Z / 2), ceil(Y / 2), ceil(X / 2)).
    """
    padded = np.pad(
        labels, [(0, n % 2) for n in labels.shape], mode="edge"
    )  # doubles each vote of a half cell
    z, y, x = (n // 2 for n in padded.shape)
    cells = padded.reshape(z, 2, y, 2, x, 2)
    best = np.zeros((z, y, x), labels.dtype)
    best_count = np.zeros((z, y, x), np.uint8)
    for value in np.unique(labels):
        count = (cells == value).sum(axis=(1, 3, 5), dtype=np.uint8)
        better = count > best_count
        best[better] = value
        best_count[better] = count[better]
    return best


def _postprocess_in_place(path: Path, rules: dict) -> None:
    """Apply post-processing rules to level 0 of an OME-Zarr labels image, slab by slab on the client, in
    place (each slab is read before it is written, and the second pass reads only its own slab), so the
    labels equal those of single-process prediction."""
    import zarr

    group = zarr.open_group(path, mode="r+")
    level0 = group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]
    depth = level0.chunks[0] * max(1, SLAB_VOXELS // (level0.chunks[0] * level0.shape[1] * level0.shape[2]))
    for z0, slab in postprocess_slabs(level0, rules, depth):
        level0[z0 : z0 + len(slab)] = slab


def add_label_pyramid(
    path: str | os.PathLike[str], levels: int = PYRAMID_LEVELS, classes: Sequence[str] = ()
) -> None:
    """Turn an OME-Zarr image with one level (as :func:`meunet.io.write_volume` writes) into a labels image
    with a multiscale pyramid.

    Writes levels ``1 .. levels`` (each from the one before with :func:`downsample_mode`, chunked like level
    0, computed with Dask: on the active ``dask.distributed`` client if there is one), their scale and
    translation (the centre of each 2^k cell), and the NGFF ``image-label`` metadata with one colour and
    name per class, so that napari (napari-ome-zarr) and neuroglancer open it as a segmentation.

    Args:
        path: the OME-Zarr group (level ``0``: uint8 (Z, Y, X) labels).
        levels: number of downsampled levels.
        classes: class names, index = label value (label 0 is drawn transparent).
    """
    import dask.array as da
    import zarr
    from matplotlib import colormaps

    group = zarr.open_group(path, mode="r+")
    ome = dict(group.attrs["ome"])
    multiscale = ome["multiscales"][0]
    base = multiscale["datasets"][0]
    transforms = {t["type"]: t[t["type"]] for t in base["coordinateTransformations"]}
    spacing = np.asarray(transforms.get("scale", [1.0, 1.0, 1.0]), float)
    origin = np.asarray(transforms.get("translation", [0.0, 0.0, 0.0]), float)
    datasets = [base]
    level0 = group[base["path"]]
    for k in range(1, levels + 1):
        source = group[str(k - 1) if k > 1 else base["path"]]
        shape = tuple(-(-n // 2) for n in source.shape)
        chunks = tuple(min(c, n) for c, n in zip(level0.chunks, shape, strict=True))
        target = group.create_array(
            str(k),
            shape=shape,
            chunks=chunks,
            dtype=level0.dtype,
            dimension_names=("z", "y", "x"),
            overwrite=True,
            config={"write_empty_chunks": True},
        )
        pairs = da.from_zarr(source, chunks=tuple(2 * c for c in chunks))
        down = pairs.map_blocks(
            downsample_mode,
            chunks=tuple(tuple(-(-c // 2) for c in axis) for axis in pairs.chunks),
            dtype=level0.dtype,
        )
        da.store(down, target, lock=False)
        factor = 2.0**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": (spacing * factor).tolist()},
                    {"type": "translation", "translation": (origin + spacing * (factor - 1) / 2).tolist()},
                ],
            }
        )
    multiscale["datasets"] = datasets
    multiscale["type"] = "mode"
    palette = colormaps["tab10"]
    ome["image-label"] = {
        "version": ome.get("version", "0.5"),
        "colors": [
            {"label-value": i, "rgba": [0, 0, 0, 0] if i == 0 else [int(255 * v) for v in palette(i - 1)]}
            for i in range(max(len(classes), 1))
        ],
        "properties": [{"label-value": i, "name": name} for i, name in enumerate(classes)],
    }
    group.attrs["ome"] = ome


# -- many volumes -----------------------------------------------------------------------------------------
def volume_pairs(input: str | os.PathLike[str], output: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """The (input, output) pairs of a prediction: one pair for a volume, or for a folder that holds
    volumes, each volume ``NAME.ext`` (or folder volume) with output ``OUTPUT/NAME.zarr``.

    A folder is one volume when it is a Zarr store or a folder of TIFF or DICOM slices; otherwise its
    entries that are volumes are taken (hidden entries and other files are ignored) and ``output`` is a
    folder.

    Raises:
        InputError: no such input, or a folder without volumes.
    """
    from meunet.io import volume_format

    input, output = Path(input), Path(output)
    if not input.is_dir() or _is_volume(input, volume_format):
        return [(input, output)]
    found = [
        p for p in sorted(input.iterdir()) if not p.name.startswith(".") and _is_volume(p, volume_format)
    ]
    if not found:
        raise InputError(input, "the folder holds no volumes")
    if output.exists() and not output.is_dir():
        raise InputError(output, "the output for a folder of volumes must be a folder")
    return [(p, output / f"{_stem(p)}.zarr") for p in found]


def _is_volume(path: Path, volume_format) -> bool:
    try:
        volume_format(path)
    except InputError:
        return False
    return True


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
