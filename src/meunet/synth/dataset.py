"""Whole synthetic volumes: in memory for tests, or streamed slab by slab to files with a ``dataset.json``."""

from __future__ import annotations

import math
import multiprocessing
import shutil
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from os import PathLike
from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io import output_lock, user_error, write_json
from meunet.synth.acquisition import Acquisition, Phantom, default_workers, scan
from meunet.synth.fly import design_fly
from meunet.synth.porous import design_porous

KINDS = ("fly", "porous")
FORMATS = ("nii.gz", "nii", "tif", "zarr")
DEFAULT_SHAPES = {"fly": (192, 96, 96), "porous": (128, 128, 128)}
PHANTOM_SETTINGS = {"fly": {"lumen": True}, "porous": {"porosity": 0.3, "inclusions": 0.04}}
SLAB_VOXELS = 1 << 22


def make_phantom(kind: str, shape: tuple[int, int, int], seed: int, **settings) -> Phantom:
    """The phantom of ``kind`` ("fly" or "porous") for a volume of ``shape`` (z, y, x), drawn from ``seed``;
    ``settings`` replace those of ``PHANTOM_SETTINGS`` (fly: lumen; porous: porosity, inclusions)."""
    settings = {**PHANTOM_SETTINGS[kind], **settings} if kind in PHANTOM_SETTINGS else settings
    if kind == "fly":
        return design_fly(shape, seed, **settings)
    if kind == "porous":
        return design_porous(shape, seed, **settings)
    raise ValueError(f"unknown phantom kind {kind!r}; choose one of {KINDS}")


def slab_depth(shape: tuple[int, int, int]) -> int:
    """Slices per slab: about 4 M voxels, at least 4."""
    return int(np.clip(SLAB_VOXELS // (shape[1] * shape[2]), 4, shape[0]))


def iter_volume(
    phantom: Phantom, acq: Acquisition, depth: int | None = None, pool: Executor | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (z0, image, labels) slab after slab, ``depth`` slices each (default :func:`slab_depth`)."""
    depth = depth or slab_depth(phantom.shape)
    for z0 in range(0, phantom.shape[0], depth):
        z1 = min(z0 + depth, phantom.shape[0])
        yield (z0, *scan(phantom, acq, z0, z1, pool))


def physics_pool(acq: Acquisition, workers: int | None):
    """A process pool for the physics model (spawned, so it is safe after torch or threads), else nothing."""
    if not acq.physics or (workers or default_workers()) <= 1:
        return nullcontext(None)
    return ProcessPoolExecutor(workers or default_workers(), mp_context=multiprocessing.get_context("spawn"))


def make_acquisition(physics: bool, snr: float | None, dtype) -> Acquisition:
    """The :class:`Acquisition` of a run: the model, the SNR (None: the default) and the image dtype."""
    kwargs = {} if snr is None else {"snr": float(snr)}
    return Acquisition(physics=physics, dtype=np.dtype(dtype).name, **kwargs)


def synthesize(
    kind: str,
    shape: tuple[int, int, int],
    seed: int = 0,
    *,
    physics: bool = False,
    snr: float | None = None,
    dtype=np.uint8,
    workers: int | None = None,
    **settings,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scan in memory, generated slab by slab: (image (Z, Y, X) ``dtype``, labels uint8).

    Args:
        kind: "fly" or "porous"; ``settings`` are its phantom's (see :func:`make_phantom`).
        shape: (Z, Y, X).
        seed: everything (shape, placement, intensities, noise) follows from it.
        physics: acquire with the projection model (radon, Poisson counts, FBP), not the image-space one.
        snr: tissue contrast over noise (default :class:`Acquisition`'s).
        dtype: np.uint8 or np.uint16 image.
        workers: processes for ``physics`` (default min(cores, 4)).
    """
    phantom = make_phantom(kind, tuple(shape), seed, **settings)
    acq = make_acquisition(physics, snr, dtype)
    image = np.empty(phantom.shape, dtype=acq.dtype)
    labels = np.empty(phantom.shape, dtype=np.uint8)
    with physics_pool(acq, workers) as pool:
        for z0, img, lab in iter_volume(phantom, acq, pool=pool):
            image[z0 : z0 + len(img)] = img
            labels[z0 : z0 + len(lab)] = lab
    return image, labels


def fly_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPES["fly"], seed: int = 0, *, lumen: bool = True, **acquisition
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic microCT scan of a fly and its labels.

    The fly's long axis lies near the volume's longest axis, tilted, in any roll; ``lumen`` gives the gut a
    darker lumen; ``acquisition`` takes ``physics``, ``snr``, ``dtype``, ``workers`` (see :func:`synthesize`).

    Returns:
        (image (Z, Y, X) uint8 or uint16, labels (Z, Y, X) uint8: 0 background, 1 gut, 2 crop).
    """
    return synthesize("fly", shape, seed, lumen=lumen, **acquisition)


def porous_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPES["porous"],
    seed: int = 0,
    *,
    porosity: float = 0.3,
    inclusions: float = 0.04,
    **acquisition,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic microCT scan of a porous material sample (a cylinder along z in a holder) and its labels.

    ``porosity`` and ``inclusions`` are the target fractions of pores and dense spheres in the sample;
    ``acquisition`` takes ``physics``, ``snr``, ``dtype``, ``workers`` (see :func:`synthesize`).

    Returns:
        (image (Z, Y, X) uint8 or uint16, labels (Z, Y, X) uint8: 0 pore or air, 1 matrix, 2 inclusion).
    """
    return synthesize("porous", shape, seed, porosity=porosity, inclusions=inclusions, **acquisition)


def volume_seeds(seed: int, count: int) -> list[int]:
    """The per-volume seeds of a data set: independent 31-bit integers drawn from (seed, index)."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0] >> 1) for i in range(count)]


def generate_dataset(
    out_dir: str | PathLike[str],
    kind: str = "fly",
    count: int = 6,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    physics: bool = False,
    snr: float | None = None,
    fmt: str = "nii.gz",
    force: bool = False,
    dtype=np.uint8,
    workers: int | None = None,
    progress: bool = False,
    preview: bool = False,
) -> Path:
    """Write ``count`` synthetic volumes and their labels to ``out_dir`` slab by slab, and a ``dataset.json``.

    Files are ``img_000.<fmt>``, ``lab_000.<fmt>``, ...; ``dataset.json`` (written last) holds ``kind``,
    ``classes``, ``shape``, ``format``, ``parameters`` (every setting used) and ``volumes`` (``image``,
    ``label`` relative to ``out_dir``, and ``seed``). Memory stays at a few slabs whatever the shape.

    Args:
        out_dir: folder to write (created); if it holds a ``dataset.json`` or ``img_*``/``lab_*`` files,
            ``force`` is needed.
        kind: "fly" or "porous". shape: (Z, Y, X), default (192, 96, 96) for fly, 128^3 for porous.
        fmt: "nii.gz", "nii", "tif" or "zarr".
        Others: as :func:`fly_phantom`; ``progress`` shows a tqdm bar; ``preview`` writes ``preview.png``
        (three planes of the first volume with its labels).

    Returns:
        Path of ``dataset.json``.

    Raises:
        InputError: bad kind, format, shape, count or SNR, or existing output without ``force``.

    >>> dataset = generate_dataset(tmp / "flies", count=2, shape=(32, 24, 24), seed=1)
    >>> sorted(p.name for p in dataset.parent.iterdir())
    ['dataset.json', 'img_000.nii.gz', 'img_001.nii.gz', 'lab_000.nii.gz', 'lab_001.nii.gz']
    """
    out = Path(out_dir)
    shape = tuple(int(s) for s in (shape or DEFAULT_SHAPES.get(kind, (0, 0, 0))))
    _check(out, kind, count, shape, snr, seed, fmt, force)
    acq = make_acquisition(physics, snr, dtype)
    seeds = volume_seeds(seed, count)
    entries = [
        {"image": f"img_{i:03d}.{fmt}", "label": f"lab_{i:03d}.{fmt}", "seed": s} for i, s in enumerate(seeds)
    ]
    with dataset_folder(out):
        from tqdm import tqdm

        slabs = count * -(-shape[0] // slab_depth(shape))
        bar = tqdm(total=slabs, unit="slab", disable=not progress, desc=f"synth {kind}")
        with physics_pool(acq, workers) as pool, bar:
            for entry in entries:
                phantom = make_phantom(kind, shape, entry["seed"])
                write_scan(out, entry, phantom, acq, pool, force, bar)
        meta = {
            "kind": kind,
            "classes": list(phantom.classes),
            "shape": list(shape),
            "format": fmt,
            "parameters": {
                "kind": kind,
                "count": count,
                "shape": list(shape),
                "seed": seed,
                "phantom": PHANTOM_SETTINGS[kind],
                "acquisition": acq.to_dict(),
            },
            "volumes": entries,
        }
        if preview:
            from meunet.io import open_volume
            from meunet.synth.preview import save_preview

            first = entries[0]
            images, labels = (open_volume(out / first[key]).array for key in ("image", "label"))
            save_preview(
                images, labels, out / "preview.png", phantom.classes, f"{kind}, seed {first['seed']}"
            )
        return write_meta(out, meta)


@contextmanager
def dataset_folder(out: Path) -> Iterator[None]:
    """Create ``out`` (with its parents) and hold its lock while a data set is written into it: a second
    run into the folder stops with one line; on failure, a folder this run created is removed again."""
    created = not out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            out.mkdir(exist_ok=True)
            yield
    except BaseException as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise (user_error(out, exc) or exc) from None
        raise


def write_scan(out: Path, entry: dict, phantom: Phantom, acq: Acquisition, pool, force: bool, bar, like=None):
    """Acquire ``phantom`` slab by slab into ``out / entry["image"]`` (``acq.dtype``) and its labels into
    ``out / entry["label"]`` (uint8), with the geometry of the :class:`~meunet.io.Volume` ``like`` (default
    1 mm); ``bar`` (tqdm) advances once per slab."""
    from meunet.io import create_writer

    with ExitStack() as stack:
        img_w = stack.enter_context(
            create_writer(out / entry["image"], phantom.shape, acq.dtype, like, force=force)
        )
        lab_w = stack.enter_context(
            create_writer(out / entry["label"], phantom.shape, np.uint8, like, force=force)
        )
        for z0, image, labels in iter_volume(phantom, acq, pool=pool):
            img_w.write(z0, image)
            lab_w.write(z0, labels)
            bar.update()


def write_meta(out: Path, meta: dict) -> Path:
    """Write ``out/dataset.json`` under a temporary name, then rename it; returns its path."""
    path = out / "dataset.json"
    write_json(path, meta)
    return path


def _check(out: Path, kind: str, count: int, shape, snr, seed: int, fmt: str, force: bool) -> None:
    if kind not in KINDS:
        raise InputError(out, f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    if count < 1:
        raise InputError(out, f"count must be at least 1, got {count}")
    if len(shape) != 3 or min(shape) < 16:
        raise InputError(out, f"shape must be three sizes (Z Y X) of at least 16, got {list(shape)}")
    check_output(out, fmt, snr, seed, force)


def check_output(out: Path, fmt: str, snr, seed: int, force: bool) -> None:
    """Raise :class:`InputError` for an unknown format, an ``snr`` that is not positive and finite, a
    negative ``seed``, or an ``out`` that is a file
    or holds a data set (``dataset.json``, ``img_*``, ``lab_*``) without ``force``."""
    if fmt not in FORMATS:
        raise InputError(out, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if snr is not None and not 0 < snr < math.inf:
        raise InputError(out, f"snr must be positive and finite, got {snr}")
    if seed < 0:
        raise InputError(out, f"seed must be 0 or more, got {seed}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.is_dir() and not force:
        taken = [p for p in out.iterdir() if p.name == "dataset.json" or p.name.startswith(("img_", "lab_"))]
        if taken:
            raise InputError(out, "holds a data set already; use --force to overwrite it")
