"""Streaming sliding-window prediction with bounded host memory, and cascade inference.

- :class:`SlidingWindow` (``meunet.infer.window``): the engine, usable on any network and any lazily
  sliceable volume; yields blended output slab by slab along z.
"""

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
    "SlidingWindow",
    "WindowCounts",
    "importance_map",
    "labels_from_scores",
    "softmax_",
    "window_starts",
]
