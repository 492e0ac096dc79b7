"""Pictures and reports for people: label overlays, and Markdown/HTML reports of tables and pictures.

Figures are drawn with matplotlib's object API (no pyplot state, no display needed) and written to a
temporary name, then renamed. A report is a title and sections of blocks (paragraphs, :class:`Table`,
:class:`Picture`), rendered once as Markdown (pictures linked by relative path) and once as a self-contained
HTML page (pictures embedded), by :func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from meunet.io import atomic_output

PLANES = ("axial (z)", "coronal (y)", "sagittal (x)")


def foreground_centre(labels, slab: int = 64) -> tuple[int, int, int]:
    """Per axis, the plane holding the most foreground (label > 0) voxels (the middle one of ties).

    Args:
        labels: (Z, Y, X) integer array or lazy array sliced along z.
        slab: slices per read.

    Returns:
        (z, y, x); the volume's centre on an axis where there is no foreground.
    """
    depth, height, width = labels.shape
    per_z = np.zeros(depth, np.int64)
    per_y = np.zeros(height, np.int64)
    per_x = np.zeros(width, np.int64)
    for z0 in range(0, depth, slab):
        mask = np.asarray(labels[z0 : z0 + slab]) > 0
        per_z[z0 : z0 + len(mask)] = mask.sum(axis=(1, 2))
        per_y += mask.sum(axis=(0, 2))
        per_x += mask.sum(axis=(0, 1))
    return tuple(_middle_of_max(c) for c in (per_z, per_y, per_x))  # type: ignore[return-value]


def _middle_of_max(counts: np.ndarray) -> int:
    """The middle index among those holding the largest count (the centre when all are zero)."""
    ties = np.flatnonzero(counts == counts.max())
    return int(ties[len(ties) // 2])


def orthogonal_slices(volume, centre: Sequence[int], slab: int = 64) -> list[np.ndarray]:
    """The three planes through ``centre`` = (z, y, x): (Y, X) at z, (Z, X) at y, (Z, Y) at x.

    ``volume`` is a (Z, Y, X) array or lazy array; it is read slab by slab along z.
    """
    z, y, x = centre
    depth = volume.shape[0]
    coronal = np.empty((depth, volume.shape[2]), volume.dtype)
    sagittal = np.empty((depth, volume.shape[1]), volume.dtype)
    for z0 in range(0, depth, slab):
        part = np.asarray(volume[z0 : z0 + slab])
        coronal[z0 : z0 + len(part)] = part[:, y, :]
        sagittal[z0 : z0 + len(part)] = part[:, :, x]
    return [np.asarray(volume[z : z + 1])[0], coronal, sagittal]


def label_colormap(n_classes: int) -> ListedColormap:
    """Black for background (label 0), then matplotlib's ``tab10`` colours."""
    tab10 = colormaps["tab10"].colors
    return ListedColormap([(0.0, 0.0, 0.0), *(tab10[(c - 1) % 10] for c in range(1, n_classes))])


def save_overlay(
    pred,
    truth,
    path: str | os.PathLike[str],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    class_names: Sequence[str] | None = None,
    image: Any = None,
) -> Path:
    """PNG of three orthogonal slices through the truth's foreground: prediction (left) beside truth (right).

    Args:
        pred, truth: (Z, Y, X) label volumes (arrays or lazy arrays), same shape.
        path: the PNG to write (temporary name, then renamed).
        spacing_mm: voxel size (z, y, x), for the aspect ratio of each plane.
        class_names: legend names by label value (default ``label 0``, ``label 1``, ...).
        image: the (Z, Y, X) scan (any real dtype, same shape), or None. Given, each plane shows it in grey
            (0.5/99.5 percentiles of the three planes as black and white) with the foreground labels on top
            at 45 % opacity; without it, the label maps alone on black.

    Returns:
        ``path``.
    """
    path = Path(path)
    centre = foreground_centre(truth)
    planes = [orthogonal_slices(v, centre) for v in (pred, truth)]
    names = list(class_names or [])
    n_classes = max(len(names), *(int(s.max()) + 1 for slices in planes for s in slices))
    names += [f"label {c}" for c in range(len(names), n_classes)]
    cmap = label_colormap(n_classes)
    sz, sy, sx = spacing_mm
    aspects = (sy / sx, sz / sx, sz / sy)
    grey = None if image is None else orthogonal_slices(image, centre)
    if grey is not None:
        values = np.concatenate([g.ravel() for g in grey]).astype(np.float32)
        values = values[np.isfinite(values)]  # NaN or inf voxels are drawn as matplotlib's "bad" colour
        low, high = np.percentile(values, (0.5, 99.5)) if values.size else (0.0, 1.0)
    fig = Figure(figsize=(8, 11), layout="constrained")
    axes = fig.subplots(3, 2)
    for row, (plane, aspect, index) in enumerate(zip(PLANES, aspects, centre, strict=True)):
        for col, (title, slices) in enumerate(zip(("prediction", "truth"), planes, strict=True)):
            ax = axes[row, col]
            labels = slices[row]
            if grey is not None:
                ax.imshow(grey[row], cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect)
                labels = np.ma.masked_equal(labels, 0)
            ax.imshow(
                labels,
                cmap=cmap,
                vmin=0,
                vmax=n_classes - 1,
                interpolation="nearest",
                aspect=aspect,
                alpha=None if grey is None else 0.45,
            )
            ax.set_title(f"{title}, {plane} = {index}")
            ax.set_axis_off()
    handles = [Patch(color=cmap(c), label=names[c]) for c in range(n_classes)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(n_classes, 5))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path


@dataclass(frozen=True)
class Table:
    """A table of text cells: ``header`` and ``rows`` (each as long as the header)."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class Picture:
    """A PNG file shown with a caption."""

    path: Path
    caption: str


Block = str | Table | Picture  # a str is one paragraph; `code` spans are kept
Section = tuple[str, Sequence[Block]]


def markdown_report(title: str, sections: Sequence[Section], base: str | os.PathLike[str]) -> str:
    """Markdown text of a report; pictures are linked relative to ``base`` (the folder of the .md file)."""
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "|".join("---" for _ in block.header) + "|")
                lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            elif isinstance(block, Picture):
                lines.append(f"![{block.caption}]({Path(os.path.relpath(block.path, base)).as_posix()})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escaped HTML of a paragraph, with Markdown `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def html_report(title: str, sections: Sequence[Section]) -> str:
    """A self-contained HTML page of a report: pictures embedded as base64 PNG data URIs."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;"
        "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
        "figcaption{color:#555;font-size:.9em}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
                body = "".join(
                    "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Picture):
                data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
                caption = html.escape(block.caption)
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
            else:
                parts.append(f"<p>{_inline(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(
    folder: str | os.PathLike[str], title: str, sections: Sequence[Section]
) -> tuple[Path, Path]:
    """Write ``report.md`` (pictures linked relative to ``folder``) and a self-contained ``report.html`` into
    ``folder`` (temporary names, then renamed); returns their paths."""
    folder = Path(folder)
    md, page = folder / "report.md", folder / "report.html"
    _write_text(md, markdown_report(title, sections, folder))
    _write_text(page, html_report(title, sections))
    return md, page


def memory_table(records: Sequence[dict[str, Any]]) -> Table:
    """Table of :func:`meunet.memory.measure_memory` records: parameters, activation and peak MiB, step s."""

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value / 2**20:,.1f}"

    rows = [
        (
            r["config"],
            f"{r['params']:,}",
            mib(r["activation_bytes"]),
            mib(r["peak_bytes"]),
            "-" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}",
        )
        for r in records
    ]
    return Table(("configuration", "parameters", "activation MiB", "peak MiB", "step s"), rows)
