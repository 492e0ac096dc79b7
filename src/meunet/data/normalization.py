"""Intensity normalisation: percentile clip, then zero mean and unit variance.

The statistics are computed once on the training volumes, stored in ``model.json`` and applied unchanged at
prediction time, so a model sees the same intensity scale on every scan of the same kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Normalization:
    """Clip to [clip_low, clip_high], subtract ``mean``, divide by ``std`` (all in input intensity units)."""

    clip_low: float
    clip_high: float
    mean: float
    std: float

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Normalise any-shaped intensities (any numeric dtype) to float32; a new array, same shape."""
        out = np.clip(array.astype(np.float32), np.float32(self.clip_low), np.float32(self.clip_high))
        out -= np.float32(self.mean)
        out /= np.float32(self.std)
        return out

    def to_dict(self) -> dict[str, float]:
        """The four statistics as plain floats, for ``model.json``."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Normalization:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a value is not finite, ``std`` is not positive, or ``clip_low > clip_high``.
        """
        norm = cls(**{k: float(values[k]) for k in ("clip_low", "clip_high", "mean", "std")})
        if not all(abs(v) <= FLOAT32_MAX for v in norm.to_dict().values()):  # NaN fails too
            raise ValueError(f"normalization values must be finite float32 numbers, got {norm.to_dict()}")
        if not norm.std > 0 or norm.clip_low > norm.clip_high:
            raise ValueError(f"normalization needs std > 0 and clip_low <= clip_high, got {norm.to_dict()}")
        shifted = [abs(v - norm.mean) for v in (norm.clip_low, norm.clip_high)]  # in float32: apply's steps
        if not all(d <= FLOAT32_MAX and d / norm.std <= FLOAT32_MAX for d in shifted):
            raise ValueError(f"normalized intensities would overflow float32, got {norm.to_dict()}")
        return norm

    @classmethod
    def fit(
        cls,
        samples: Iterable[np.ndarray],
        percentiles: tuple[float, float] = (0.5, 99.5),
    ) -> Normalization:
        """Statistics from intensity samples (e.g. a strided subsample of each training volume).

        Args:
            samples: arrays of any shape and numeric dtype; they are flattened and pooled.
            percentiles: lower and upper clip percentiles.

        Returns:
            The fitted normalisation; ``std`` is at least 1e-6 so constant inputs do not divide by zero.
        """
        pooled = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in samples])
        low, high = np.percentile(pooled, percentiles)
        clipped = np.clip(pooled, low, high)
        return cls(float(low), float(high), float(clipped.mean()), max(float(clipped.std()), 1e-6))
