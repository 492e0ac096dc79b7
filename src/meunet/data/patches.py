"""Lazy patch reading: local and context patches cut from large volumes with zero padding at the borders.

Volumes stay on disk (or wherever their lazy array reads from); each sample reads only its own patch boxes.
The training stream is endless: sample ``k`` belongs to epoch ``k // K`` (K kept patches) and is patch
``order(epoch)[k % K]``, a seeded permutation per epoch. A sample is a pure function of ``k``, so loader
workers, restarts and resumption cannot change what is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from os import PathLike

import numpy as np
import torch

from meunet.data.normalization import Normalization
from meunet.data.sampling import PatchIndex, Shape3
from meunet.io import iter_slabs, require_finite
from meunet.models.cascade import stage1_fill


def read_padded(array, start: Sequence[int], size: Sequence[int], fill: float | np.ndarray = 0) -> np.ndarray:
    """Cut a box from the last three axes of ``array``, filling what lies outside the array with ``fill``.

    Args:
        array: (..., Z, Y, X) numpy or lazy array supporting slicing; only the box is read.
        start: (z, y, x) box start, may be negative or reach past the end.
        size: (z, y, x) box size.
        fill: value outside the array; an array of shape ``array.shape[:-3] + (1, 1, 1)`` fills per channel.

    Returns:
        ``array.dtype`` array of shape ``array.shape[:-3] + size``.
    """
    lead = tuple(array.shape[:-3])
    out = np.full((*lead, *size), fill, dtype=array.dtype)
    low = [max(s, 0) for s in start]
    high = [min(s + n, d) for s, n, d in zip(start, size, array.shape[-3:], strict=True)]
    if all(h > lo for lo, h in zip(low, high, strict=True)):
        source = tuple(slice(lo, h) for lo, h in zip(low, high, strict=True))
        target = tuple(slice(lo - s, h - s) for lo, h, s in zip(low, high, start, strict=True))
        out[(..., *target)] = np.asarray(array[(slice(None),) * len(lead) + source])
    return out


def sample_stride(shape: tuple[int, ...], max_samples: int) -> int:
    """The stride along each axis at which :func:`scan_image` keeps about ``max_samples`` voxels.

    >>> sample_stride((150, 256, 256), 2_000_000)
    2
    """
    return max(1, math.ceil((math.prod(shape) / max_samples) ** (1 / 3)))


def scan_image(array, path: str | PathLike[str], max_samples: int = 2_000_000) -> np.ndarray:
    """Read a (Z, Y, X) image once, slab by slab: check it is finite, and keep a strided intensity sample.

    Args:
        array: (Z, Y, X) numpy or lazy array of any real dtype.
        path: named in errors.
        max_samples: about how many voxels to keep (every :func:`sample_stride`-th voxel along each axis).

    Returns:
        float32 (z, y, x) sample ``array[::stride, ::stride, ::stride]``, for :meth:`Normalization.fit`
        and the planner's measure of flat windows.

    Raises:
        InputError: NaN or infinite intensities.
    """
    stride = sample_stride(array.shape, max_samples)
    samples = []
    for z0, data in iter_slabs(array):
        require_finite(path, z0, data)
        samples.append(data[(-z0) % stride :: stride, ::stride, ::stride].astype(np.float32))
    return np.concatenate(samples)


def sample_order(seed: int, epoch: int, counts: np.ndarray, oversample: float = 0.0) -> np.ndarray:
    """The seeded order of one epoch: which kept patch each of its K samples reads.

    A permutation of the K patches, in which a fraction ``oversample`` of the positions (each position with
    that probability) is replaced by a patch drawn to hold foreground: a class chosen uniformly among the
    foreground classes present in some patch, then a patch with probability proportional to its voxels of
    that class. This is nnU-Net's foreground oversampling, made class-balanced so that a rare class (a
    small organ) is seen as often as a large one; ``oversample=0`` is the paper's plain grid sampling.

    Args:
        seed, epoch: seed the draws.
        counts: int64 (K, C) voxels per class in each kept patch (:attr:`PatchIndex.counts`).
        oversample: fraction in [0, 1] of positions replaced.

    Returns:
        int64 (K,) patch numbers.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(counts))
    present = np.flatnonzero(counts[:, 1:].any(axis=0)) + 1
    if oversample > 0 and present.size:
        positions = np.flatnonzero(rng.random(len(counts)) < oversample)
        classes = rng.choice(present, positions.size)
        for c in present:
            chosen = positions[classes == c]
            order[chosen] = rng.choice(len(counts), chosen.size, p=counts[:, c] / counts[:, c].sum())
    return order


class PatchDataset(torch.utils.data.Dataset):
    """Sample ``k`` of the endless training stream as a dict of CPU tensors.

    Keys: ``image`` float32 (1, *patch) normalised; ``label`` uint8 (*patch); with ``context`` also
    ``context_image`` float32 (1, *context) and ``context_label`` uint8 (*context), centred on the local
    patch; with ``stage1`` also ``stage1`` float16 (C, *patch) cached stage-1 probabilities. Outside a
    volume, images read raw intensity 0, labels 0 and probabilities one-hot background.

    Args:
        images, labels: per training volume, callables returning its (Z, Y, X) lazy image and label arrays
            (called once per process, so the dataset pickles to loader workers unopened).
        index: the kept patches.
        patch: local patch side (z, y, x).
        context: context patch side, or None (stage 2).
        normalization: applied to image patches.
        seed: seeds the per-epoch order.
        stage1: per training volume, a callable returning its (C, Z, Y, X) stage-1 probabilities, or None.
        oversample: fraction of samples drawn to hold a foreground class (see :func:`sample_order`).
    """

    def __init__(
        self,
        images: Sequence[Callable],
        labels: Sequence[Callable],
        index: PatchIndex,
        patch: Shape3,
        context: Shape3 | None,
        normalization: Normalization,
        seed: int,
        stage1: Sequence[Callable] | None = None,
        oversample: float = 0.0,
    ) -> None:
        self.openers = {"image": images, "label": labels, "stage1": stage1}
        self.index, self.patch, self.context = index, patch, context
        self.normalization, self.seed, self.oversample = normalization, seed, oversample
        self._arrays: dict[str, list] | None = None
        self._order: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        """Patches per epoch (the stream itself is endless)."""
        return len(self.index)

    def _arrays_of(self, volume: int) -> dict:
        if self._arrays is None:
            self._arrays = {k: [f() for f in v] for k, v in self.openers.items() if v is not None}
        return {k: v[volume] for k, v in self._arrays.items()}

    def _patch_number(self, k: int) -> int:
        epoch, position = divmod(k, len(self.index))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, sample_order(self.seed, epoch, self.index.counts, self.oversample))
        return int(self._order[1][position])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i = self._patch_number(k)
        arrays = self._arrays_of(int(self.index.volume[i]))
        start = [int(s) for s in self.index.start[i]]
        boxes = {"": (start, self.patch)}
        if self.context is not None:
            margin = [(c - p) // 2 for c, p in zip(self.context, self.patch, strict=True)]
            boxes["context_"] = ([s - m for s, m in zip(start, margin, strict=True)], self.context)
        sample = {}
        for prefix, (box_start, size) in boxes.items():
            image = self.normalization.apply(read_padded(arrays["image"], box_start, size))
            sample[prefix + "image"] = torch.from_numpy(image[None])
            label = read_padded(arrays["label"], box_start, size).astype(np.uint8, copy=False)
            sample[prefix + "label"] = torch.from_numpy(label)
        if "stage1" in arrays:
            probs = arrays["stage1"]
            background = np.reshape(stage1_fill(probs.shape[0]), (-1, 1, 1, 1)).astype(probs.dtype)
            sample["stage1"] = torch.from_numpy(read_padded(probs, start, self.patch, background))
        return sample
