"""In-memory segmentation for the widget: :meth:`meunet.infer.Predictor.labels` on an array, with a
callback per window (progress, and cancelling by raising from it)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from meunet.infer import Predictor, PredictSettings, WindowCounts


class _Reporting(WindowCounts):
    """Window counts that call ``on_window(done, total)`` as each window is visited."""

    def __init__(self, on_window: Callable[[int, int], None], total: int) -> None:
        self._on_window, self._total, self._windows = on_window, total, 0
        super().__init__()

    @property
    def windows(self) -> int:  # type: ignore[override]
        return self._windows

    @windows.setter
    def windows(self, value: int) -> None:
        self._windows = value
        self._on_window(value, self._total)


def segment(
    model_dir,
    array,
    *,
    overlap: float = 0.5,
    device: str = "cpu",
    precision: str = "auto",
    skip_empty: bool = False,
    postprocess: bool = True,
    on_window: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[np.ndarray, list[str]]:
    """Labels of a (Z, Y, X) array (numpy, or lazy slicing to numpy), equal to ``meunet predict``'s.

    Args:
        model_dir: a model directory; its ``window`` and ``normalization`` are used.
        array: the raw scan.
        overlap, device, precision: see :class:`meunet.infer.SlidingWindow`.
        skip_empty: skip all-air windows, with the default air threshold (see :func:`meunet.infer.predict`).
        postprocess: apply ``model.json``'s post-processing rules (:mod:`meunet.infer.postprocess`), as
            ``meunet predict`` does.
        on_window: called with (windows visited, total) as each window is visited, from the calling
            thread; an exception it raises stops the prediction.

    Returns:
        (uint8 labels (Z, Y, X), class names).

    Raises:
        InputError: a bad model directory or settings.
    """
    settings = PredictSettings(
        overlap=overlap, device=device, precision=precision, skip_empty=skip_empty, postprocess=postprocess
    )
    predictor = Predictor(model_dir, settings)
    stages = 1 if predictor.bundle.cascade is None else 2
    grid = predictor.engine.grid(array.shape)
    counts = _Reporting(on_window, stages * math.prod(len(g) for g in grid))
    return predictor.labels(array, counts), list(predictor.bundle.classes)
