"""Streaming sliding-window prediction with bounded host memory, and cascade inference.

- :class:`SlidingWindow` (``meunet.infer.window``): the engine, usable on any network and any lazily
  sliceable volume; yields blended output slab by slab along z.
- :func:`predict` (``meunet.infer.predict``): a model directory applied to a volume file, streamed to disk;
  :func:`predict_stage1` writes a cascade's stage-1 output (prediction, and stage-2 training caches).
"""

from meunet.infer.predict import (
    ProbabilityWriter,
    estimate_peak_bytes,
    peak_rss_bytes,
    predict,
    predict_stage1,
)
from meunet.infer.window import (
    Input,
    SlidingWindow,
    WindowCounts,
    importance_map,
    labels_from_scores,
    softmax_,
    window_starts,
)

__all__ = [
    "Input",
    "ProbabilityWriter",
    "SlidingWindow",
    "WindowCounts",
    "estimate_peak_bytes",
    "importance_map",
    "labels_from_scores",
    "peak_rss_bytes",
    "predict",
    "predict_stage1",
    "softmax_",
    "window_starts",
]
