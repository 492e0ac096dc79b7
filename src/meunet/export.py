"""``meunet export``: a model directory as ONNX files or as a BioImage Model Zoo package (model format 0.5).

- ``onnx``: a folder with ``stage1.onnx`` (image -> logits), ``stage2.onnx`` for a cascade (image and stage-1
  output -> logits, as :func:`meunet.infer.predict` runs stage 2 on blended stage-1 output), ``model.onnx``
  (the whole model as one module: normalised image -> class probabilities) and ``export.json`` (the check).
- ``bioimageio``: a zip package whose weights are the whole model's ``pytorch_state_dict`` (architecture
  :class:`ProbabilityNet`, imported from meunet) with its ONNX conversion as child weights; preprocessing is
  meunet's normalisation (clip, then fixed mean and standard deviation); tiles are parameterised in steps of
  16 voxels (four max-pools) from the model's window up, with a halo of a quarter window.

Every ONNX file is checked against PyTorch with onnxruntime on a test window: the largest absolute
difference is reported and the labels (argmax over classes) must be equal.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meunet.data.normalization import Normalization
from meunet.errors import InputError
from meunet.io import atomic_output, check_outputs
from meunet.models import load_model_dir
from meunet.models.bundle import STAGE1_ARCHITECTURES
from meunet.models.cascade import build_cascade

FORMATS = ("bioimageio", "onnx")
MULTIPLE = 16  # input sides must be multiples of 2 ** (number of max-pools)
OPSET = 17
# ONNX and PyTorch outputs differing by more than this fraction of the outputs' largest magnitude (at
# least 1: probabilities are compared absolutely) mean a broken conversion; a logit of a few thousand (batch
# norm after little training) differs by a few 1e-3 from float rounding alone
MAX_DIFFERENCE = 1e-3
CITATION = (
    "Wang, Blackie, Miguel-Aliaga, Bai. Memory-efficient segmentation of high-resolution volumetric MicroCT "
    "images. Medical Imaging with Deep Learning (MIDL), 2022."
)
CITATION_URL = "https://arxiv.org/abs/2205.15941"


class ProbabilityNet(nn.Module):
    """A whole model as one module: normalised image (N, 1, Z, Y, X) -> class probabilities (N, C, Z, Y, X).

    Args:
        stage1: ``model.json``'s ``stage1`` (architecture and constructor arguments).
        stage2: ``model.json``'s ``stage2`` (cascade spec) or None for a stage-1-only model.
    """

    def __init__(self, stage1: dict[str, Any], stage2: dict[str, Any] | None = None) -> None:
        super().__init__()
        spec = dict(stage1)
        net = STAGE1_ARCHITECTURES[spec.pop("architecture", "meunet")](**spec)
        self.net = net if stage2 is None else build_cascade(net, stage2)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of the final stage's logits."""
        return torch.softmax(self.net(image), dim=1)


def export(
    model_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    fmt: str,
    *,
    sample: str | os.PathLike[str] | None = None,
    author: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export a model directory; the output is built under a temporary name and renamed into place.

    Args:
        model_dir: directory written by training (``model.json``, ``stage*.pt``).
        output: ``onnx``: a folder; ``bioimageio``: a ``.zip`` package.
        fmt: ``"onnx"`` or ``"bioimageio"``.
        sample: image volume (any format meunet reads) whose central window becomes the test window;
            default a synthetic fly scaled into the normalisation's clip range.
        author: the package's author (``bioimageio``; default the login name).
        force: replace an existing output.

    Returns:
        ``{"output", "format", "window", "checks": {file: {"max_abs_difference", "labels_equal"}}}``.

    Raises:
        InputError: not a model directory, unknown format, an existing output without ``force``, a
            ``.zip``-less package name, an unreadable or too small sample.
    """
    model_dir, output = Path(model_dir), Path(output).absolute()
    if fmt not in FORMATS:
        raise InputError("--format", f"must be one of {', '.join(FORMATS)}, not {fmt!r}")
    check_outputs([output], force, inputs=[model_dir])
    if fmt == "bioimageio" and output.suffix != ".zip":
        raise InputError(output, "a BioImage Model Zoo package is a .zip file: give a name ending in .zip")
    bundle = load_model_dir(model_dir)
    meta = bundle.meta
    normalization = Normalization.from_dict(meta["normalization"])
    tile = tuple(-(-int(w) // MULTIPLE) * MULTIPLE for w in meta.get("window") or (96, 96, 96))
    raw = _test_window(sample, tile, normalization)
    whole = ProbabilityNet(meta["stage1"], meta.get("stage2"))
    whole.net.load_state_dict((bundle.cascade or bundle.stage1).state_dict())
    image = torch.from_numpy(normalization.apply(raw)[None, None])
    with atomic_output(output, force) as tmp:
        work = tmp if fmt == "onnx" else tmp.with_name(f"{tmp.name}.files")  # the zip's files, then removed
        work.mkdir()
        checks = {"model.onnx": _onnx(whole, (image,), ["image"], "probabilities", work / "model.onnx")}
        if fmt == "onnx":
            checks["stage1.onnx"] = _onnx(bundle.stage1, (image,), ["image"], "logits", work / "stage1.onnx")
            if bundle.cascade is not None:
                stage1_maps = bundle.cascade.stage1_forward(image)
                checks["stage2.onnx"] = _onnx(
                    bundle.cascade, (image, stage1_maps), ["image", "stage1"], "logits", work / "stage2.onnx"
                )
            summary = {"format": fmt, "window": list(tile), "checks": checks, "model": meta}
            (work / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
        else:
            try:
                _package(whole, meta, normalization, raw, image, work, tmp, model_dir.name, author)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return {"output": str(output), "format": fmt, "window": list(tile), "checks": checks}


def _test_window(sample, tile: tuple[int, int, int], normalization: Normalization) -> np.ndarray:
    """float32 raw intensities (tile): the central window of ``sample``, or a synthetic fly."""
    if sample is None:
        from meunet.synth import fly_phantom

        fly = fly_phantom(tile, seed=0)[0].astype(np.float32) / 255
        return normalization.clip_low + fly * (normalization.clip_high - normalization.clip_low)
    from meunet.io import open_volume, require_finite

    array = open_volume(sample).array
    if any(s < t for s, t in zip(array.shape, tile, strict=True)):
        raise InputError(sample, f"shape {tuple(array.shape)} is smaller than the test window {tile}")
    lo = [(s - t) // 2 for s, t in zip(array.shape, tile, strict=True)]
    window = np.asarray(array[tuple(slice(a, a + t) for a, t in zip(lo, tile, strict=True))])
    require_finite(sample, lo[0], window)
    return window.astype(np.float32)


def _onnx(net: nn.Module, inputs: tuple, names: list[str], output: str, path: Path) -> dict[str, Any]:
    """Export ``net`` (batch and spatial axes dynamic) and compare onnxruntime's output with PyTorch's."""
    import onnxruntime

    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():  # the tracer warns about the padding, a no-op for multiples of 16
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, inputs, path, dynamo=False, opset_version=OPSET, input_names=names, output_names=[output],
            dynamic_axes={name: axes for name in [*names, output]},
        )  # fmt: skip
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    with torch.no_grad():
        expected = net(*inputs).numpy()
    difference = float(np.abs(got - expected).max())
    labels_equal = bool(np.array_equal(got.argmax(1), expected.argmax(1)))
    if difference > MAX_DIFFERENCE * max(1.0, float(np.abs(expected).max())):
        raise RuntimeError(f"{path.name}: ONNX differs from PyTorch by {difference:g}")
    return {"max_abs_difference": difference, "labels_equal": labels_equal}


def _package(
    whole: ProbabilityNet,
    meta: dict[str, Any],
    normalization: Normalization,
    raw: np.ndarray,
    image: torch.Tensor,
    work: Path,
    package: Path,
    name: str,
    author: str | None,
) -> Path:
    """Write the package's files into ``work`` and zip them with bioimageio.spec into ``package``."""
    import tifffile
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    with torch.no_grad():
        probabilities = whole(image).numpy()
    classes = list(meta["classes"])
    np.save(work / "test_input.npy", raw[None, None])
    np.save(work / "test_output.npy", probabilities)
    tifffile.imwrite(work / "sample_input.tif", raw)
    tifffile.imwrite(work / "sample_output.tif", probabilities[0])
    torch.save(whole.state_dict(), work / "weights.pt")
    _cover(raw, probabilities.argmax(1)[0], len(classes), work / "cover.png")
    (work / "README.md").write_text(_documentation(meta, normalization, raw.shape))
    spacing = meta.get("spacing") or [1.0, 1.0, 1.0]
    tile = raw.shape

    def axes(channel_names: list[str], space_axis, **per_axis: list) -> list:
        """Batch, channel and the z, y, x axes (``per_axis``: one value per spatial axis)."""
        space = (
            space_axis(
                id=bio.AxisId(a), unit="millimeter", scale=float(spacing[i]),
                **{key: values[i] for key, values in per_axis.items()},
            )
            for i, a in enumerate("zyx")
        )  # fmt: skip
        names = [bio.Identifier(_identifier(n)) for n in channel_names]
        return [bio.BatchAxis(), bio.ChannelAxis(channel_names=names), *space]

    inputs = [
        bio.InputTensorDescr(
            id=bio.TensorId("raw"),
            description="the scan in its own intensity units (any numeric type, read as float32)",
            axes=axes(
                ["raw"], bio.SpaceInputAxis, size=[bio.ParameterizedSize(min=t, step=MULTIPLE) for t in tile]
            ),
            test_tensor=bio.FileDescr(source=work / "test_input.npy"),
            sample_tensor=bio.FileDescr(source=work / "sample_input.tif"),
            preprocessing=[
                bio.ClipDescr(kwargs=bio.ClipKwargs(min=normalization.clip_low, max=normalization.clip_high)),
                bio.FixedZeroMeanUnitVarianceDescr(
                    kwargs=bio.FixedZeroMeanUnitVarianceKwargs(mean=normalization.mean, std=normalization.std)
                ),
            ],
        )
    ]
    outputs = [
        bio.OutputTensorDescr(
            id=bio.TensorId("probabilities"),
            description="class probabilities; labels are their argmax over the channel axis",
            axes=axes(
                classes,
                bio.SpaceOutputAxisWithHalo,
                size=[bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId(a)) for a in "zyx"],
                halo=[max(1, t // 4) for t in tile],
            ),
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            test_tensor=bio.FileDescr(source=work / "test_output.npy"),
            sample_tensor=bio.FileDescr(source=work / "sample_output.tif"),
        )
    ]
    weights = bio.WeightsDescr(
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=work / "weights.pt",
            architecture=bio.ArchitectureFromLibraryDescr(
                callable=bio.Identifier("ProbabilityNet"),
                import_from="meunet.export",
                kwargs={"stage1": meta["stage1"], "stage2": meta.get("stage2")},
            ),
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
        ),
        onnx=bio.OnnxWeightsDescr(
            source=work / "model.onnx", opset_version=OPSET, parent="pytorch_state_dict"
        ),
    )
    model = bio.ModelDescr(
        name=f"meunet {name}"[:128],
        description=f"meU-net {'cascade' if meta.get('stage2') else 'stage 1'}: 3D microCT segmentation "
        f"into {', '.join(classes)}",
        authors=[bio.Author(name=author or getpass.getuser())],
        cite=[bio.CiteEntry(text=CITATION, url=bio.HttpUrl(CITATION_URL))],
        license=bio.LicenseId("MIT"),
        documentation=bio.FileDescr(source=work / "README.md"),
        covers=[bio.FileDescr(source=work / "cover.png")],
        tags=["3d", "microct", "semantic-segmentation", "unet", "meunet"],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config={"meunet": {"model.json": meta}},
    )
    return save_bioimageio_package(model, output_path=package)


def _identifier(name: str) -> str:
    """A class name as a bioimageio identifier (letters, digits and underscores)."""
    return "".join(c if c.isalnum() else "_" for c in name) or "class"


def _cover(raw: np.ndarray, labels: np.ndarray, n_classes: int, path: Path) -> None:
    """A 2:1 PNG: the test window's middle slice, and the predicted labels over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meunet.report import label_colormap

    z = raw.shape[0] // 2
    fig, axes = plt.subplots(1, 2, figsize=(4, 2), dpi=128)
    for ax in axes:
        ax.imshow(raw[z], cmap="gray")
        ax.set_axis_off()
    shown = np.ma.masked_equal(labels[z], 0)
    axes[1].imshow(shown, cmap=label_colormap(n_classes), vmin=0, vmax=n_classes - 1, alpha=0.6)
    fig.subplots_adjust(0, 0, 1, 1, 0, 0)
    fig.savefig(path)
    plt.close(fig)


def _documentation(meta: dict[str, Any], normalization: Normalization, tile) -> str:
    """The package's README: what the model does, its input, output, tiling and citation."""
    classes = ", ".join(f"{i} {c}" for i, c in enumerate(meta["classes"]))
    kind = "two-stage cascade (meU-net, then a U-net joined by post-concatenation)"
    return (
        "# meunet model\n\n"
        f"A {kind if meta.get('stage2') else 'meU-net (stage 1 only)'} that segments 3D microCT scans, "
        "trained with meunet (MIT licence).\n\n"
        f"- **Classes** (output channels, label = argmax): {classes}.\n"
        f"- **Input**: one channel, the scan in its own intensity units; clipped to "
        f"[{normalization.clip_low:g}, {normalization.clip_high:g}], then standardised with mean "
        f"{normalization.mean:g} and standard deviation {normalization.std:g} (the training statistics).\n"
        f"- **Tiles**: sides from {' x '.join(map(str, tile))} (z, y, x) in steps of 16 voxels; crop a "
        "quarter of the tile (the halo) from each side of every output tile, as meunet's sliding window "
        "with overlap 0.5 does.\n"
        "- **Weights**: PyTorch state dict (the architecture is imported from the `meunet` package) and "
        "its ONNX conversion, checked against PyTorch on the test tensor.\n\n"
        "\n## Validation\n\n"
        "The test tensors reproduce the PyTorch weights' output on one window (a synthetic fly unless a "
        "sample scan was given at export); the ONNX weights match it to float precision with equal labels. "
        "They do not measure accuracy: score the model on labelled scans of your own with "
        "`meunet evaluate` (Dice, IoU, HD95 per class).\n\n"
        f"Please cite: {CITATION}\n"
    )
