"""Sample data: a small synthetic fly scan and its labels (:func:`meunet.synth.fly_phantom`)."""

from __future__ import annotations

from meunet.napari._layers import labels_kwargs
from meunet.synth.fly import CLASSES

SHAPE = (96, 48, 48)


def synthetic_fly() -> list[tuple]:
    """The fly image and its labels (0 background, 1 gut, 2 crop), generated in a fraction of a second."""
    from meunet.synth import fly_phantom

    image, labels = fly_phantom(SHAPE, seed=0)
    return [
        (image, {"name": "fly"}, "image"),
        (labels, {"name": "fly labels", **labels_kwargs(CLASSES)}, "labels"),
    ]
