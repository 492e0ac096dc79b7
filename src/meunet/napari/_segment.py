"""In-memory segmentation for the widget: :func:`meunet.infer.predict`'s engine and cascade steps on an
array, with a callback per window (progress, and cancelling by raising from it)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from meunet.data.normalization import Normalization
from meunet.errors import InputError
from meunet.infer import Input, SlidingWindow, WindowCounts
from meunet.infer.postprocess import apply_rules
from meunet.infer.predict import _skip_settings, _stage1_input
from meunet.models import load_model_dir


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
    bundle = load_model_dir(model_dir, device)
    if bundle.meta.get("in_channels") != 1 or not bundle.meta.get("window"):
        raise InputError(Path(model_dir) / "model.json", "needs a one-channel model with a 'window'")
    try:
        engine = SlidingWindow(tuple(bundle.meta["window"]), overlap, device=device, precision=precision)
    except ValueError as exc:
        raise InputError("settings", str(exc)) from None
    normalization = Normalization.from_dict(bundle.meta["normalization"])
    image = Input(array, normalization.apply)
    n_classes = len(bundle.classes)
    skip = _skip_settings(normalization, n_classes, None) if skip_empty else {}
    stages = 1 if bundle.stage2 is None else 2
    counts = _Reporting(on_window, stages * math.prod(len(g) for g in engine.grid(array.shape)))
    with tempfile.TemporaryDirectory(prefix="meunet-napari-") as scratch:
        inputs = [image]
        if bundle.stage2 is not None:
            stage1 = Path(scratch) / "stage1.zarr"
            inputs.append(_stage1_input(bundle.stage2, image, stage1, engine, 0, counts, False, skip))
        labels = engine.labels(bundle.net, inputs, n_classes, counts=counts, **skip)
    rules = bundle.meta.get("postprocessing") or {}
    if postprocess and rules:
        labels = apply_rules(labels, rules)
    return labels, list(bundle.classes)
