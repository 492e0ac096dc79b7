"""A picture of a generated volume: three orthogonal slices, plain and with the labels overlaid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from meunet.io import atomic_output
from meunet.report import PLANES, foreground_centre, label_colormap, orthogonal_slices


def save_preview(
    image, labels, path: str | os.PathLike[str], class_names: Sequence[str], title: str = ""
) -> Path:
    """PNG of the three planes through the labels' foreground: the image (top), the labels over it (bottom).

    Args:
        image, labels: (Z, Y, X) arrays or lazy arrays (read slab by slab), same shape.
        path: the PNG to write (temporary name, then renamed).
        class_names: names by label value; label 0 is not coloured.
    """
    path = Path(path)
    centre = foreground_centre(labels)
    planes = orthogonal_slices(image, centre)
    masks = orthogonal_slices(labels, centre)
    top = float(np.iinfo(planes[0].dtype).max) if planes[0].dtype.kind in "ui" else float(planes[0].max())
    cmap = label_colormap(len(class_names))
    widths = [p.shape[1] for p in planes]
    height = max(p.shape[0] for p in planes)
    fig = Figure(figsize=(max(6.0, 4.5 * sum(widths) / height + 0.5), 9.0), layout="constrained")
    axes = fig.subplots(2, 3, width_ratios=widths)
    for col, (plane, mask, name, index) in enumerate(zip(planes, masks, PLANES, centre, strict=True)):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(plane, cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            if row:
                colours = cmap(mask)
                colours[..., 3] = np.where(mask > 0, 0.45, 0.0)
                ax.imshow(colours, interpolation="nearest")
            ax.set_title(f"{name} = {index}", fontsize=9)
            ax.set_axis_off()
    handles = [Patch(color=cmap(c), label=class_names[c]) for c in range(1, len(class_names))]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    if title:
        fig.suptitle(title)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path
