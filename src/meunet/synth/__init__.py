"""Synthetic microCT with ground truth: a fly (gut, crop) and a porous material sample, any size, or any
label map re-acquired (:func:`from_labels`).

Phantoms are analytic shapes evaluated slab by slab, acquired by an image-space model (default) or a
projection model (``physics``), and written slab by slab, so memory does not grow with the volume.
See ``docs/synth.md``.
"""

from meunet.synth.acquisition import Acquisition
from meunet.synth.dataset import (
    fly_phantom,
    generate_dataset,
    iter_volume,
    make_phantom,
    porous_phantom,
    synthesize,
)
from meunet.synth.labels import from_labels

__all__ = [
    "Acquisition",
    "fly_phantom",
    "from_labels",
    "generate_dataset",
    "iter_volume",
    "make_phantom",
    "porous_phantom",
    "synthesize",
]
