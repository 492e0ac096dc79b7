"""The classical baseline a network has to beat: a 3x3x3 median filter, then multi-Otsu thresholds.

The thresholds are fitted on a training image (scikit-image ``threshold_multiotsu`` with one class per label
class); the k-th darkest threshold class is mapped to the label class with the k-th lowest mean intensity in
the training labels. Works on whole in-memory volumes (crops of benchmark size, not paper-size scans).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter


def _smooth(image: np.ndarray) -> np.ndarray:
    """(Z, Y, X) ``image`` after a 3x3x3 median filter, float32."""
    return median_filter(np.asarray(image, dtype=np.float32), size=3, mode="nearest")


@dataclass(frozen=True)
class ThresholdBaseline:
    """A fitted median + multi-Otsu segmentation.

    Attributes:
        thresholds: C - 1 increasing intensity thresholds (on the median-filtered image).
        classes: C label values: ``classes[k]`` is the label of the k-th darkest threshold class.
    """

    thresholds: tuple[float, ...]
    classes: tuple[int, ...]

    @classmethod
    def fit(cls, image: np.ndarray, labels: np.ndarray, n_classes: int) -> ThresholdBaseline:
        """Fit on a training image (Z, Y, X), any real dtype, and its labels (same shape, values < C).

        Classes absent from ``labels`` rank brightest (after the present ones, by label value).
        """
        from skimage.filters import threshold_multiotsu

        smooth = _smooth(image)
        thresholds = threshold_multiotsu(smooth, classes=n_classes)
        counts = np.bincount(labels.ravel(), minlength=n_classes)[:n_classes]
        sums = np.bincount(
            labels.ravel(), weights=np.asarray(image, dtype=np.float64).ravel(), minlength=n_classes
        )
        means = np.where(counts > 0, sums[:n_classes] / np.maximum(counts, 1), np.inf)
        order = np.argsort(means, kind="stable")
        return cls(tuple(float(t) for t in thresholds), tuple(int(c) for c in order))

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Labels (Z, Y, X) uint8 of an image (Z, Y, X) like the training one."""
        bins = np.digitize(_smooth(image), self.thresholds)
        return np.asarray(self.classes, dtype=np.uint8)[bins]
