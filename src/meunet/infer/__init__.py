"""Streaming sliding-window prediction with bounded host memory, and cascade inference.

- :class:`SlidingWindow` (``meunet.infer.window``): the engine, usable on any network and any lazily
  sliceable volume; yields blended output slab by slab along z, over its own window grid or given starts.
- :class:`Predictor` (``meunet.infer.predict``): a model directory loaded and checked once with
  :class:`PredictSettings`, applied to files (:meth:`Predictor.predict`), arrays (:meth:`Predictor.labels`)
  and the blocks of a Dask run (:meth:`Predictor.block`); :func:`predict` is one file's shortcut.
- The window for a memory budget: :func:`choose_window` (a pure function of an estimate),
  :func:`peak_estimator` and :func:`peak_bytes` (the estimate), :func:`memory_budget`;
  :meth:`Predictor.window_for` puts them together.
- The cascade's stage-1 input, one implementation for training caches, files and blocks:
  :func:`stage1_slabs` computes it, :func:`predict_stage1` writes it to Zarr, :func:`stage1_input` pads it.
"""

from meunet.infer.predict import (
    Predictor,
    PredictSettings,
    WindowChoice,
    choose_window,
    estimate_peak_bytes,
    image_input,
    memory_budget,
    peak_bytes,
    peak_estimator,
    predict,
    predict_stage1,
    stage1_input,
    stage1_slabs,
    window_candidates,
)
from meunet.infer.window import (
    Input,
    SlidingWindow,
    WindowCounts,
    importance_map,
    labels_from_scores,
    softmax_,
    window_starts,
    windows_over,
)

__all__ = [
    "Input",
    "PredictSettings",
    "Predictor",
    "SlidingWindow",
    "WindowChoice",
    "WindowCounts",
    "choose_window",
    "estimate_peak_bytes",
    "image_input",
    "importance_map",
    "labels_from_scores",
    "memory_budget",
    "peak_bytes",
    "peak_estimator",
    "predict",
    "predict_stage1",
    "softmax_",
    "stage1_input",
    "stage1_slabs",
    "window_candidates",
    "window_starts",
    "windows_over",
]
