"""Re-acquiring a label map: any (Z, Y, X) label volume becomes a phantom of one attenuation per class,
scanned by the models of :mod:`meunet.synth.acquisition`, so that the image's labels are exact.

The attenuation of each class comes from the original scan when one is given (its class means, mapped
linearly onto the phantoms' scale: the darkest class at the air level, the brightest at the cuticle level,
so the classes keep the scan's intensity order and relative spacing), else from the seed (label 0 darkest,
then increasing with the label value, each level jittered). The label map is read slab by slab, twice at
most (checks and counts, then the acquisition), and never converted to floats whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from meunet.errors import InputError
from meunet.io import Volume, iter_slabs, open_volume, require_finite
from meunet.synth.dataset import (
    check_output,
    dataset_folder,
    make_acquisition,
    physics_pool,
    slab_depth,
    write_meta,
    write_scan,
)

MAX_CLASSES = 255
MAX_EDGES = (
    0.5  # a label map is made of regions: at most this fraction of voxels differ from their x neighbour
)
LOW, HIGH = 0.08, 0.85  # the phantoms' air and brightest (fly cuticle) intensities before acquisition
FIRST = 0.45  # level of label 1 when drawn from the seed (the porous matrix's)
JITTER = 0.06
_LEVELS = 104


@dataclass(frozen=True)
class LabelPhantom:
    """A label map as a phantom: voxel intensity = the attenuation of its class.

    Attributes:
        labels: (Z, Y, X) integer array or lazy array (``labels[z0:z1]`` reads slices), values in [0, C).
        seed: the acquisition's seed (noise, rings, jitter).
        classes: C class names, index = label value.
        levels: C attenuations (intensities before acquisition, about 0.08 to 0.85).
        counts: C voxel counts.
    """

    labels: Any
    seed: int
    classes: tuple[str, ...]
    levels: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of the label map."""
        return tuple(int(n) for n in self.labels.shape)  # type: ignore[return-value]

    @property
    def reference_levels(self) -> tuple[float, float]:
        """(darkest class, most frequent of the brighter classes): the contrast the acquisition's SNR (and
        the physics model's attenuation scale) refers to."""
        present = [c for c, n in enumerate(self.counts) if n]
        air = min(self.levels[c] for c in present)
        brighter = [c for c in present if self.levels[c] > air]
        return air, self.levels[max(brighter, key=lambda c: self.counts[c])]

    def render(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
        """Slices [z0, z1): (intensity float32, labels uint8), both (z1 - z0, Y, X)."""
        labels = np.asarray(self.labels[z0:z1]).astype(np.uint8)
        return np.asarray(self.levels, dtype=np.float32)[labels], labels


def scan_labels(path: str | PathLike[str]) -> tuple[Volume, np.ndarray]:
    """Open a label map and check it slab by slab.

    Returns:
        (the lazily opened volume, int64 voxel counts per label value (C,), C = largest value + 1).

    Raises:
        InputError: unreadable or not 3D, values that are not integers (NaN included), negative, or 255 or
            more (more than 255 classes), fewer than two classes present, or more than half of the voxels
            differing from their neighbour along x (an intensity image: real label maps have 1-8 %, microCT
            scans 60-98 %).
    """
    volume = open_volume(path)
    array = volume.array
    if np.dtype(array.dtype).kind not in "biuf":
        raise InputError(path, f"not a label map: {array.dtype} voxels")
    counts = np.zeros(MAX_CLASSES, dtype=np.int64)
    edges = 0
    for _, slab in iter_slabs(array, slab_depth(array.shape)):
        if slab.dtype.kind == "f" and not np.array_equal(slab, np.round(slab)):
            raise InputError(path, "not a label map: the voxels are not whole numbers")
        low, high = slab.min(), slab.max()
        if low < 0:
            raise InputError(path, f"not a label map: negative value {low}")
        if high >= MAX_CLASSES:
            raise InputError(path, f"not a label map: value {high} means more than {MAX_CLASSES} classes")
        counts += np.bincount(slab.ravel().astype(np.intp), minlength=MAX_CLASSES)
        edges += np.count_nonzero(slab[..., 1:] != slab[..., :-1])
    if edges > MAX_EDGES * array.shape[0] * array.shape[1] * (array.shape[2] - 1):
        raise InputError(
            path, "not a label map: most voxels differ from their neighbour (an intensity image?)"
        )
    n_classes = int(np.flatnonzero(counts)[-1]) + 1
    if np.count_nonzero(counts) < 2:
        raise InputError(path, "not a label map: a single class")
    return volume, counts[:n_classes]


def seed_levels(n_classes: int, seed: int) -> np.ndarray:
    """(C,) float64 attenuations from ``seed``, increasing with the label value: label 0 at the air level,
    labels 1 .. C-1 evenly from 0.45 to 0.85, each jittered by up to 6 % (then sorted, so the order holds)."""
    base = np.concatenate([[LOW], np.linspace(FIRST, HIGH, n_classes - 1)])
    jitter = np.random.default_rng((seed, _LEVELS)).uniform(1 - JITTER, 1 + JITTER, n_classes)
    return np.sort(base * jitter)


def image_levels(image: str | PathLike[str], labels: Volume, counts: np.ndarray) -> np.ndarray:
    """(C,) float64 attenuations from a scan of the label map: each class's mean intensity, mapped linearly
    so that the darkest class gets the air level (0.08) and the brightest 0.85; absent classes get 0.08.

    Raises:
        InputError: the image cannot be read, differs in shape, or every class has the same mean.
    """
    scan = open_volume(image).array
    if tuple(scan.shape) != tuple(labels.array.shape):
        raise InputError(
            image, f"shape {tuple(scan.shape)} differs from the labels' {tuple(labels.array.shape)}"
        )
    n_classes = len(counts)
    sums = np.zeros(n_classes)
    depth = slab_depth(scan.shape)
    for z0, slab in iter_slabs(scan, depth):
        require_finite(image, z0, slab)
        lab = np.asarray(labels.array[z0 : z0 + depth]).astype(np.intp).ravel()
        sums += np.bincount(lab, weights=slab.ravel(), minlength=n_classes)
    present = counts > 0
    means = sums[present] / counts[present]
    if means.max() <= means.min():
        raise InputError(image, "every class has the same mean intensity")
    levels = np.full(n_classes, LOW)
    levels[present] = LOW + (means - means.min()) / (means.max() - means.min()) * (HIGH - LOW)
    return levels


def class_names(labels: str | PathLike[str], n_classes: int, given: list[str] | None = None) -> list[str]:
    """Names of label values 0 .. C-1: ``given``; else a ``dataset.json`` beside the labels that lists them;
    else the row of a ``README.md`` beside them (or one folder up) that reads ```name`: 0 air, 1 bone, ...``
    for all C values; else ``class_0`` .. ``class_<C-1>``.

    Raises:
        InputError: ``given`` does not name exactly C classes.
    """
    path = Path(labels)
    if given is not None:
        if len(given) != n_classes:
            raise InputError(path, f"{len(given)} class names given for {n_classes} label values")
        return list(given)
    meta = path.parent / "dataset.json"
    if meta.is_file():
        try:
            content = json.loads(meta.read_text())
            if (
                any(v.get("label") == path.name for v in content["volumes"])
                and len(content["classes"]) == n_classes
            ):
                return [str(c) for c in content["classes"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not a meunet data set: look elsewhere
    for readme in (path.parent / "README.md", path.parent.parent / "README.md"):
        if readme.is_file() and (names := _readme_names(readme.read_text(), path.name, n_classes)):
            return names
    return [f"class_{c}" for c in range(n_classes)]


def _readme_names(text: str, name: str, n_classes: int) -> list[str] | None:
    """The class names a README's table cell ```name`: 0 a, 1 b (note)`` gives, if it names 0 .. C-1."""
    match = re.search(rf"`{re.escape(name)}`:([^|\n]*)", text)
    if match is None:
        return None
    parts = [re.fullmatch(r"\s*(\d+)\s+(.+?)\s*", p) for p in re.sub(r"\([^)]*\)", "", match[1]).split(",")]
    if not all(parts) or [int(p[1]) for p in parts] != list(range(n_classes)):
        return None
    return [p[2] for p in parts]


def from_labels(
    labels: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    image: str | PathLike[str] | None = None,
    seed: int = 0,
    physics: bool = False,
    snr: float | None = None,
    fmt: str = "nii.gz",
    dtype=np.uint8,
    classes: list[str] | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Re-acquire a label map: write ``out_dir/img_000.<fmt>`` (the scan, ``dtype``), ``lab_000.<fmt>`` (the
    labels, an exact uint8 copy) with the label map's geometry, and, last, a ``dataset.json`` as
    :func:`~meunet.synth.generate_dataset` writes it (``kind`` "from-labels"; ``parameters`` add the
    ``source`` files, ``attenuation`` per class and where it came from). Memory stays at a few slabs.

    Args:
        labels: (Z, Y, X) label map, any format meunet reads; integer values 0 .. 254.
        out_dir: folder to write (created); one holding a data set needs ``force``.
        image: the original scan of ``labels`` (same shape): the class attenuations follow its class means
            (:func:`image_levels`); without it they are drawn from ``seed`` (:func:`seed_levels`).
        seed: noise, rings and (without ``image``) attenuations follow from it.
        physics, snr, fmt, workers, progress: as :func:`~meunet.synth.generate_dataset`.
        dtype: np.uint8 or np.uint16 image.
        classes: names of the label values (default: :func:`class_names` finds them).

    Returns:
        Path of ``dataset.json``.

    Raises:
        InputError: not a label map (see :func:`scan_labels`), a bad image, class names, format or SNR, or an
            existing data set in ``out_dir`` without ``force``; nothing is written then.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    check_output(out, fmt, snr, seed, force)
    volume, counts = scan_labels(labels)
    levels = seed_levels(len(counts), seed) if image is None else image_levels(image, volume, counts)
    names = class_names(labels, len(counts), classes)
    phantom = LabelPhantom(
        volume.array, int(seed), tuple(names), tuple(levels.tolist()), tuple(counts.tolist())
    )
    acq = make_acquisition(physics, snr, dtype)
    entry = {"image": f"img_000.{fmt}", "label": f"lab_000.{fmt}", "seed": int(seed)}
    with dataset_folder(out):
        bar = tqdm(total=-(-phantom.shape[0] // slab_depth(phantom.shape)), unit="slab", disable=not progress)
        with physics_pool(acq, workers) as pool, bar:
            write_scan(out, entry, phantom, acq, pool, force, bar, like=volume)
        shape = list(phantom.shape)
        meta = {
            "kind": "from-labels",
            "classes": names,
            "shape": shape,
            "format": fmt,
            "parameters": {
                "kind": "from-labels",
                "count": 1,
                "shape": shape,
                "seed": int(seed),
                "source": {
                    "labels": str(Path(labels).resolve()),
                    "image": image and str(Path(image).resolve()),
                },
                "attenuation": phantom.levels,
                "attenuation_from": "seed" if image is None else "image",
                "acquisition": acq.to_dict(),
            },
            "volumes": [entry],
        }
        return write_meta(out, meta)
