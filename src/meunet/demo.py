"""``meunet demo``: the whole job on synthetic flies, in minutes on a CPU.

Generate a small synthetic fly set (:func:`meunet.synth.generate_dataset`), train a meU-net with narrow
widths (:func:`meunet.train.train`, stage 1 alone: on a CPU the demo's minutes buy more accuracy from stage 1
than from a stage 2, see ``docs/demo.md``), predict the held-out test volume
(:func:`meunet.infer.predict`), evaluate it (:func:`meunet.metrics.evaluate`, with the overlay picture),
measure the activation memory of one training step at the demo's settings and at paper scale
(:func:`meunet.memory.measure_memory` on the ``meta`` device), and write ``report.md`` and ``report.html``.

Output folder layout: ``data/`` (volumes, ``dataset.json``), ``model/`` (the model directory with
``curves.png``), ``prediction.nii.gz``, ``evaluation.json``, ``overlay.png``, ``memory.json``, ``demo.json``
(settings, timings and Dice), ``report.md``, ``report.html``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meunet.errors import InputError
from meunet.io import output_lock, write_json

OUTPUTS = (
    "data",
    "model",
    "prediction.nii.gz",
    "evaluation.json",
    "overlay.png",
    "memory.json",
    "demo.json",
    "report.md",
    "report.html",
)
MANIFEST = ".meunet-demo.json"
"""What a demo wrote into its folder (written first, completed last): ``--force`` deletes only that."""


@dataclass(frozen=True)
class DemoSettings:
    """Size of a demo run.

    Attributes:
        shape: (z, y, x) of each synthetic volume.
        count: volumes; the last is the test volume, the one before it validates, the rest train.
        widths: five encoder widths of both stages.
        patch: local patch side; the context side is :func:`meunet.models.context_side` of it.
        batch: patches per step.
        learning_rate: Adam's step size.
        iterations: training steps of stage 1.
        validations: validations of stage 1 (the best one's weights are kept).
    """

    shape: tuple[int, int, int]
    count: int
    widths: tuple[int, int, int, int, int]
    patch: int
    batch: int
    learning_rate: float
    iterations: int
    validations: int


FULL = DemoSettings((192, 96, 96), 6, (8, 16, 32, 64, 64), 32, 2, 9e-4, 3000, 5)
QUICK = DemoSettings((128, 64, 64), 5, (8, 16, 32, 32, 32), 32, 4, 2e-3, 60, 1)


def train_mapping(out: Path, dataset: Path, settings: DemoSettings, progress: bool, seed: int = 0) -> dict:
    """The ``meunet train`` configuration (see ``docs/config.md``) of a demo run, as a mapping, without the
    stage and its iteration limits (see :func:`meunet.train.config.stage_mapping`).

    The volumes of ``dataset`` (a ``dataset.json``) are split as :class:`DemoSettings` says: the last one is
    left out (the test volume), the one before it validates, the rest train.
    """
    meta = json.loads(dataset.read_text())
    volumes = meta["volumes"]
    pairs = [{k: str(dataset.parent / v[k]) for k in ("image", "label")} for v in volumes[:-1]]
    return {
        "output": str(out),
        "seed": seed,
        "device": "cpu",
        "data": {"train": pairs[:-1], "validation": pairs[-1:]},
        "model": {
            "classes": meta["classes"],
            "stage1": "meunet",  # the method, which a CPU plan would replace by a plain U-net
            "widths": list(settings.widths),
            "checkpointing": False,
        },
        "patch": {"size": settings.patch},
        "training": {
            "batch_size": settings.batch,
            "learning_rate": settings.learning_rate,
            "progress": progress,
        },
    }


def _prepare(out: Path, force: bool) -> None:
    """Refuse to overwrite an earlier demo (or anything else) without ``force``; with it, delete only what
    an earlier demo wrote, as its :data:`MANIFEST` lists it (checked in full before anything is deleted);
    then write this run's manifest before any output."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(out, "is not empty (use --force to replace the demo's outputs in it)")
        for path in _earlier_outputs(out):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, {"outputs": list(OUTPUTS), "files": None})


def _earlier_outputs(out: Path) -> list[Path]:
    """The entries of ``out`` an earlier demo wrote. InputError if one of :data:`OUTPUTS` is there without
    a manifest, or holds a file the manifest of a finished demo does not list (someone else's)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        outputs, files = manifest["outputs"], manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        outputs, files = [], None
    foreign = [out / n for n in OUTPUTS if (out / n).exists() and n not in outputs]
    if files is not None:  # a finished demo: every file it wrote is listed
        written = set(files)
        foreign += [p for n in outputs for p in _files(out / n) if str(p.relative_to(out)) not in written]
    if foreign:
        raise InputError(
            foreign[0], "was not written by an earlier meunet demo: --force replaces only the demo's outputs"
        )
    return [out / n for n in outputs if (out / n).exists()] + [out / MANIFEST]


def _files(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every file below it."""
    if not path.exists():
        return []
    return [path] if not path.is_dir() else [p for p in path.rglob("*") if not p.is_dir()]


def run_demo(
    out: str | os.PathLike[str] = "demo_out", quick: bool = False, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the demo into the folder ``out`` and write its report.

    Args:
        out: output folder (created); see the module docstring for its content.
        quick: the small settings :data:`QUICK` (every step in about a minute, too few to learn) instead of
            :data:`FULL`.
        force: replace the outputs of an earlier demo in ``out``; without it a non-empty ``out`` is refused.
        progress: show progress bars.

    Returns:
        ``demo.json``'s content: ``settings``, ``seconds`` per step, ``dice`` (class name -> Dice on the test
        volume), ``mean_foreground_dice``, ``report`` and ``report_html`` (paths), ``machine``.

    Raises:
        InputError: ``out`` is a file, or not empty and ``force`` is not given, or another demo is
            writing into it.
    """
    out = Path(out)
    with output_lock(out):
        return _run(out, QUICK if quick else FULL, force, progress)


def _run(out: Path, settings: DemoSettings, force: bool, progress: bool) -> dict[str, Any]:
    """:func:`run_demo`, under the lock of its folder."""
    from meunet.infer import predict
    from meunet.memory import StepSetting, measure_memory
    from meunet.metrics import evaluate
    from meunet.synth import generate_dataset
    from meunet.train import parse_config, train
    from meunet.train.config import stage_mapping

    _prepare(out, force)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    dataset = generate_dataset(
        out / "data", "fly", settings.count, settings.shape, seed=0, fmt="nii", progress=progress
    )
    seconds["synth"] = time.perf_counter() - start
    mapping = train_mapping(out / "model", dataset, settings, progress)
    begin = time.perf_counter()
    train(parse_config(stage_mapping(mapping, 1, settings.iterations, settings.validations), "demo"))
    seconds["stage1"] = time.perf_counter() - begin
    test = json.loads(dataset.read_text())["volumes"][-1]
    begin = time.perf_counter()
    stats = predict(out / "model", out / "data" / test["image"], out / "prediction.nii.gz", progress=progress)
    seconds["predict"] = time.perf_counter() - begin
    classes = mapping["model"]["classes"]
    evaluation = evaluate(
        out / "prediction.nii.gz",
        out / "data" / test["label"],
        class_names=classes,
        json_file=out / "evaluation.json",
        overlay=out / "overlay.png",
        image=out / "data" / test["image"],
    )
    memory = {
        "demo": measure_memory(
            StepSetting(settings.patch, 1.5, settings.batch, settings.widths, device="meta")
        ),
        "paper": measure_memory(StepSetting(device="meta")),
    }
    write_json(out / "memory.json", memory, indent=1)
    seconds["total"] = time.perf_counter() - start
    dice = {c["name"]: c["dice"] for c in evaluation["classes"]}
    summary = {
        "settings": asdict(settings),
        "seconds": seconds,
        "prediction": stats,
        "dice": dice,
        "mean_foreground_dice": sum(list(dice.values())[1:]) / (len(dice) - 1),
        "machine": _machine(),
    }
    report, page = _report(out, summary, evaluation, memory)
    summary.update(report=str(report), report_html=str(page))
    write_json(out / "demo.json", summary, indent=1)
    files = [str(p.relative_to(out)) for n in OUTPUTS for p in _files(out / n)]
    write_json(out / MANIFEST, {"outputs": list(OUTPUTS), "files": sorted(files)})
    return summary


def _machine() -> str:
    """Processor, threads torch uses, and the load average (the demo's times depend on all three)."""
    import torch

    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU threads, torch {torch.__version__} "
        f"using {torch.get_num_threads()} threads{load}"
    )


def _missed(evaluation: dict) -> str:
    """A sentence naming the foreground classes the network never predicted (empty if none)."""
    missed = [c["name"] for c in evaluation["classes"][1:] if c["voxels_pred"] == 0]
    if not missed:
        return ""
    why = (
        " The crop is a small sac (about 0.2 % of the volume) whose wall looks like the gut's up close; "
        "telling them apart takes context and longer training (see docs/demo.md)."
    )
    return (
        f" The network predicted no voxel of {', '.join(missed)} (Dice 0): the demo's short training did not "
        "learn it." + (why if "crop" in missed else "")
    )


def _report(out: Path, summary: dict, evaluation: dict, memory: dict) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` of a finished demo."""
    from meunet.models import context_side
    from meunet.report import Picture, Table, memory_table, write_report

    s, t = summary["settings"], summary["seconds"]
    shape = " x ".join(str(v) for v in s["shape"])

    def cell(value: float | None, digits: int = 3) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    dice = Table(
        ("class", "Dice", "IoU", "precision", "recall", "HD95 (mm)", "voxels (truth)", "voxels (predicted)"),
        [
            (
                c["name"],
                cell(c["dice"]),
                cell(c["iou"]),
                cell(c["precision"]),
                cell(c["recall"]),
                cell(c["hd95_mm"], 1),
                f"{c['voxels_truth']:,}",
                f"{c['voxels_pred']:,}",
            )
            for c in evaluation["classes"]
        ],
    )
    timing = Table(("step", "seconds"), [(k, f"{v:.0f}") for k, v in t.items()])
    context = context_side(s["patch"])
    sections = [
        (
            "What was run",
            [
                f"{s['count']} synthetic fly volumes of {shape} voxels (z, y, x): {s['count'] - 2} for "
                "training, 1 for validation, 1 held out for testing (`data/`). Stage 1 is a meU-net (local "
                f"patch {s['patch']}^3, context {context}^3, widths {s['widths']}), trained for "
                f"{s['iterations']} steps of batch {s['batch']} (`model/`), alone: on a CPU the demo's "
                "minutes buy more accuracy from stage 1 than from a stage 2 (docs/demo.md). The test volume "
                "was predicted with `meunet.infer.predict` (Gaussian-blended sliding windows) and compared "
                "with its labels.",
                f"Machine: {summary['machine']}.",
                timing,
            ],
        ),
        (
            "Dice on the held-out test volume",
            [
                dice,
                f"Mean foreground Dice: {summary['mean_foreground_dice']:.3f}." + _missed(evaluation),
                Picture(
                    out / "overlay.png",
                    "Three planes through the test volume: prediction and truth over the scan",
                ),
            ],
        ),
        (
            "Training curves",
            [Picture(out / "model" / "curves.png", "Training loss and validation Dice per class")],
        ),
        (
            "Memory of one training step",
            [
                "Bytes saved for backward in one training step (forward, W_D loss, backward), counted with "
                "autograd's saved-tensor hooks (`meunet bench memory --device meta`); exact and the same on "
                "every device. `unet-fov` is a plain U-net on the whole context field of view at full "
                "resolution; `-ckpt` adds activation checkpointing; the cascades' rows are stage 2.",
                f"At the demo's settings (local {s['patch']}^3, context {context}^3, batch {s['batch']}):",
                memory_table(memory["demo"]),
                "At paper scale (local 160^3, context 240^3, widths 16..128, batch 1):",
                memory_table(memory["paper"]),
            ],
        ),
    ]
    return write_report(out, "meunet demo report", sections)
