"""The paper's comparison (docs/method.md section 6): five configurations trained with the same budget over
several seeds, evaluated on held-out volumes, on synthetic flies or on the real microCT scans.

Configurations, all with the same widths, batch and steps per stage:

- ``unet-local``: plain 3D U-net on the local patch (``model.stage1: unet``).
- ``unet-fov``: plain 3D U-net on the whole context field of view at full resolution (patch = context side).
- ``meunet``: the meU-net alone (stage 1).
- ``cascade-pre``: that meU-net, frozen, plus a stage 2 fed by pre-concatenation (stage-1 probabilities as
  input channels; the nnU-Net cascade).
- ``cascade-post``: the same with post-concatenation (the method). The cascades train twice the steps (stage
  1 then stage 2); their training time includes stage 1's.

``--data synthetic``: a synthetic fly set (``meunet.synth.generate_dataset``): train, validation and test
volumes. ``--data real``: the scans in ``../shared/data/real`` (fly with its 3 silver classes, bone and sand
with 2), each cut into 2 x 2 x 2 disjoint blocks: 6 train, 1 validates, 1 tests (see :func:`block_split`).
Silver labels are algorithmic (median filter, multi-Otsu, opening), so the scores say how well each network
learns them.

Per run: Dice and IoU per class pooled over the test volumes, training wall time, prediction voxels per second
(``meunet.infer.predict``); per configuration: activation bytes, peak memory and time of one training step
(``meunet.memory.measure_memory``). Writes ``benchmarks/results/paper_table_<name>.json`` and rewrites
``docs/results.md`` from every such JSON present (with ``benchmarks/results/notes.md``, a person's reading
of the numbers, and ``benchmarks/results/real_vs_threshold.md``, the section of
``benchmarks/real_vs_threshold.py``, where they exist).

``--budget-mib M --minutes T`` makes it the comparison at equal memory and equal time instead of equal
steps: each configuration gets the largest local patch whose training step keeps at most M MiB of
activations (:func:`equal_memory_sides`) and T minutes for its whole ``meunet train --time-budget`` command
(:func:`train_timed`; a cascade that cannot train in T is a row that says so). ``--first-seed`` runs a part
of the seeds; parts of one comparison, run one after another or at once, merge into one JSON.

    .venv/bin/python benchmarks/paper_table.py [--data synthetic|real] [--seeds 3] [--first-seed 0]
        [--iterations 300] [--validations 2] [--budget-mib M --minutes T] [--shape Z Y X] [--threads N]
        [--paper-scale] [--device cpu|cuda] [--precision fp32|bf16] [--work DIR] [--report-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from meunet.errors import InputError
from meunet.infer import predict
from meunet.io import Volume, open_volume, read_volume, write_volume
from meunet.memory import StepSetting, measure_memory, measure_step
from meunet.metrics import dice_from_confusion, evaluate_labels, iou_from_confusion
from meunet.models import context_side
from meunet.report import Table, markdown_report, memory_table
from meunet.synth import generate_dataset
from meunet.train import parse_config, train
from meunet.train.config import stage_mapping

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTES = RESULTS / "notes.md"
THRESHOLD = (
    RESULTS / "real_vs_threshold.md"
)  # the section of benchmarks/real_vs_threshold.py, kept as written
REAL = ROOT.parent / "shared" / "data" / "real"
TITLES = {"synthetic": "Synthetic flies", "real": "Real microCT"}
CONFIGS = ("unet-local", "unet-fov", "meunet", "cascade-pre", "cascade-post")
BENCH_NAMES = {
    "unet-local": "unet-local",
    "unet-fov": "unet-fov",
    "meunet": "meunet-stage1",
    "cascade-pre": "cascade-pre-stage2",
    "cascade-post": "cascade-post-stage2",
}


def bench_name(config: str, checkpointing: bool) -> str:
    """The :mod:`meunet.memory` configuration measuring ``config``'s training step (the U-nets with
    ``-ckpt`` when trained with checkpointing; the meU-net always checkpoints there, as the method does)."""
    name = BENCH_NAMES[config]
    return f"{name}-ckpt" if checkpointing and config.startswith("unet") else name


REAL_SCANS = {  # name: (image, silver labels, class names)
    "fly": ("qim3d/fly_150x256x256.tif", "qim3d/fly_150x256x256_silver3.tif", ["air", "tissue", "cuticle"]),
    "bone": ("qim3d/bone_128x128x128.tif", "qim3d/bone_128x128x128_silver2.tif", ["background", "bone"]),
    "sand": ("pymicro/sand_100x200x200.tif", "pymicro/sand_100x200x200_silver2.tif", ["pore", "grain"]),
}


@dataclass(frozen=True)
class Budget:
    """What every configuration gets.

    Attributes:
        widths: five encoder widths (both stages).
        patch: local patch side; the context side (and ``unet-fov``'s patch) is 1.5 times it.
        batch: patches per step.
        iterations: steps per stage.
        validations: validations per stage (the best one's weights are kept).
        checkpointing: activation checkpointing of every conv stage.
        shape: (z, y, x) of the synthetic volumes.
        volumes: synthetic (train, validation, test) volume counts.
        activation_mib: with ``minutes``, the equal-memory comparison: each configuration gets the largest
            local patch whose training step keeps at most this many MiB of activations (counted on ``meta``,
            every stage of a cascade), and ``patch`` and ``iterations`` are not used.
        minutes: wall time of each configuration's whole training command (both stages and the out-of-fold
            folds of a cascade included), as ``training.time_budget``.
    """

    widths: tuple[int, ...] = (8, 16, 32, 64, 64)
    patch: int = 32
    batch: int = 2
    iterations: int = 300
    validations: int = 2
    checkpointing: bool = False
    shape: tuple[int, int, int] = (192, 96, 96)
    volumes: tuple[int, int, int] = (4, 1, 2)
    activation_mib: float | None = None
    minutes: float | None = None

    @property
    def context(self) -> int:
        """Context side, as the trainer computes it (``docs/config.md``, ``patch.context_scale`` 1.5)."""
        return context_side(self.patch)


PAPER_SCALE = Budget((16, 32, 64, 128, 128), 160, 2, 3000, 10, True, (480, 320, 320), (6, 1, 2))


@dataclass(frozen=True)
class Split:
    """One data set: image/label path pairs ({"image", "label"}) for training, validation and testing."""

    name: str
    classes: list[str]
    train: list[dict[str, str]]
    validation: list[dict[str, str]]
    test: list[dict[str, str]]


SIDES = range(16, 257, 8)  # local sides tried at equal memory (the U-nets pad to multiples of 16 inside)


def equal_memory_sides(budget: Budget, precision: str, largest: int) -> dict[str, dict]:
    """Per configuration: the largest local side of :data:`SIDES` whose training step keeps at most
    ``budget.activation_mib`` MiB of activations (a cascade: its stage 1 and its stage 2 both), counted on
    ``meta`` as ``meunet bench memory`` does, and whose field of view (the context side, but for
    ``unet-local``) is at most ``largest`` (the smallest side of a training volume), with those bytes:
    ``{config: {"patch", "activation_bytes"}}``. ``unet-fov`` trains on the context side of its side."""
    limit = budget.activation_mib * 2**20
    stages = {c: [bench_name(c, budget.checkpointing)] for c in CONFIGS}
    for cascade in ("cascade-pre", "cascade-post"):
        stages[cascade].insert(0, BENCH_NAMES["meunet"])

    def activations(config: str, side: int) -> int:
        setting = StepSetting(side, 1.5, budget.batch, budget.widths, precision, "meta")
        return max(measure_step(name, setting)["activation_bytes"] for name in stages[config])

    sides = {}
    for config in CONFIGS:
        fits = []
        for side in SIDES:  # activations grow with the side
            view = side if config == "unet-local" else context_side(side)
            saved = activations(config, side) if view <= largest else limit + 1
            if saved > limit:
                break
            fits.append({"patch": side, "activation_bytes": saved})
        if not fits:
            raise SystemExit(f"--budget-mib {budget.activation_mib}: no local side of {config} fits")
        sides[config] = fits[-1]
    return sides


def synthetic_split(work: Path, budget: Budget) -> Split:
    """A synthetic fly set (seed 0) in ``work/data``: train, validation and test volumes in that order."""
    n_train, n_val, n_test = budget.volumes
    dataset = generate_dataset(
        work / "data", "fly", n_train + n_val + n_test, budget.shape, seed=0, fmt="nii", force=True
    )
    meta = json.loads(dataset.read_text())
    pairs = [{k: str(dataset.parent / v[k]) for k in ("image", "label")} for v in meta["volumes"]]
    return Split("synthetic", meta["classes"], pairs[:n_train], pairs[n_train:-n_test], pairs[-n_test:])


def block_split(name: str, image: np.ndarray, labels: np.ndarray, classes: list[str], work: Path) -> Split:
    """Cut a scan (Z, Y, X) into its 2 x 2 x 2 disjoint blocks (``.npy`` in ``work``). Ranked by foreground
    fraction, the second block tests, the third validates and the other six train (so that test and
    validation blocks hold foreground while the richest block still trains)."""
    work.mkdir(parents=True, exist_ok=True)
    halves = [(slice(0, n // 2), slice(n // 2, n)) for n in image.shape]
    boxes = [tuple(halves[axis][(k >> (2 - axis)) & 1] for axis in range(3)) for k in range(8)]
    order = np.argsort([-np.count_nonzero(labels[box]) for box in boxes], kind="stable")
    pairs = []
    for k, box in enumerate(boxes):
        pair = {"image": str(work / f"{name}_img_{k}.npy"), "label": str(work / f"{name}_lab_{k}.npy")}
        write_volume(pair["image"], Volume(np.ascontiguousarray(image[box])), force=True)
        write_volume(pair["label"], Volume(np.ascontiguousarray(labels[box])), force=True)
        pairs.append(pair)
    train = [pairs[k] for k in order if k not in order[1:3]]
    return Split(name, classes, train, [pairs[order[2]]], [pairs[order[1]]])


def real_splits(work: Path, real: Path = REAL) -> list[Split]:
    """Block splits of the real scans (``REAL_SCANS``)."""
    splits = []
    for name, (image, labels, classes) in REAL_SCANS.items():
        arrays = [read_volume(real / path).array for path in (image, labels)]
        splits.append(block_split(name, arrays[0], arrays[1].astype(np.uint8), classes, work / "data"))
    return splits


def _train(mapping: dict, stage: int, budget: Budget) -> float:
    """Train one stage of ``mapping``; returns the wall time in seconds."""
    start = time.perf_counter()
    config = stage_mapping(mapping, stage, budget.iterations, budget.validations)
    train(parse_config(config, f"{mapping['output']} (stage {stage})"), force=True)
    return time.perf_counter() - start


def _mapping(split: Split, budget: Budget, config: str, seed: int, out: Path, device: str, precision: str):
    """The training configuration shared by both comparisons: ``config``'s network (the U-nets checkpoint
    as ``budget`` says, the meU-net and the cascades always, as :func:`bench_name` measures them)."""
    model = {
        "classes": split.classes,
        "widths": list(budget.widths),
        "checkpointing": budget.checkpointing if config.startswith("unet") else True,
        "stage1": "unet" if config.startswith("unet") else "meunet",
    }
    if config.startswith("cascade"):
        model["fusion"] = config.removeprefix("cascade-")
    return {
        "output": str(out),
        "seed": seed,
        "device": device,
        "precision": precision,
        "data": {"train": split.train, "validation": split.validation},
        "model": model,
        "training": {"batch_size": budget.batch, "progress": False},
    }


def train_configurations(
    split: Split, budget: Budget, seed: int, work: Path, device: str, precision: str
) -> dict[str, tuple[Path, float]]:
    """Train the five configurations into ``work/<config>`` for ``budget.iterations`` steps per stage;
    returns {config: (model dir, training seconds)}.

    The cascades start from copies of the ``meunet`` model directory (same stage 1), and share one cache of
    stage-1 probabilities.
    """
    runs = {}
    for name in CONFIGS[:3]:
        mapping = _mapping(split, budget, name, seed, work / name, device, precision)
        mapping["patch"] = {"size": budget.context if name == "unet-fov" else budget.patch}
        runs[name] = (work / name, _train(mapping, 1, budget))
    for name in CONFIGS[3:]:
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        for file in ("model.json", "stage1.pt", "train_log.csv"):
            shutil.copy2(work / "meunet" / file, out / file)
        if (work / "cascade-pre" / "stage1_cache").is_dir() and name == "cascade-post":
            shutil.copytree(work / "cascade-pre" / "stage1_cache", out / "stage1_cache")
        mapping = {
            **_mapping(split, budget, name, seed, out, device, precision),
            "patch": {"size": budget.patch},
        }
        runs[name] = (out, runs["meunet"][1] + _train(mapping, 2, budget))
    return runs


def train_timed(
    split: Split, budget: Budget, sides: dict[str, dict], seed: int, work: Path, device: str, precision: str
) -> dict[str, tuple[Path, float]]:
    """The equal-memory, equal-time comparison: each configuration is one training command into
    ``work/<config>`` with ``training.time_budget`` of ``budget.minutes`` at its side of ``sides`` (see
    :func:`equal_memory_sides`); a cascade trains its own stage 1, its out-of-fold folds and its stage 2
    within that time, as ``meunet train --time-budget`` does. Returns {config: (model dir, seconds)}, or
    {config: (None, why)} for one whose smallest run does not fit the time (the planner's refusal)."""
    runs: dict[str, tuple[Path | None, float | str]] = {}
    for name in CONFIGS:
        side = sides[name]["patch"]
        mapping = _mapping(split, budget, name, seed, work / name, device, precision)
        mapping["stages"] = "both" if name.startswith("cascade") else "1"
        mapping["patch"] = {"size": context_side(side) if name == "unet-fov" else side}
        mapping["training"]["time_budget"] = budget.minutes * 60
        start = time.perf_counter()
        try:
            train(parse_config(mapping, f"{name} (seed {seed})"), force=True)
        except InputError as exc:
            if exc.path != "time budget":
                raise
            runs[name] = (None, exc.message)
            print(f"{split.name} seed {seed} {name}: {exc.message}", flush=True)
            continue
        runs[name] = (work / name, time.perf_counter() - start)
    return runs


def evaluate_model(model_dir: Path, split: Split, work: Path, device: str, precision: str) -> dict:
    """Predict every test volume; Dice and IoU per class from the confusion pooled over them, and speed."""
    n_classes = len(split.classes)
    confusion = np.zeros((n_classes, n_classes), np.int64)
    voxels, seconds = 0, 0.0
    for i, pair in enumerate(split.test):
        out = work / f"prediction_{i}.npy"
        stats = predict(
            model_dir, pair["image"], out, device=device, precision=precision, progress=False, force=True
        )
        voxels, seconds = voxels + stats["voxels"], seconds + stats["seconds"]
        truth = open_volume(pair["label"]).array
        confusion += np.asarray(
            evaluate_labels(open_volume(out).array, truth, n_classes=n_classes)["confusion"]
        )
    return {
        "dice": dice_from_confusion(confusion).tolist(),
        "iou": iou_from_confusion(confusion).tolist(),
        "predict_voxels_per_second": voxels / seconds,
    }


def machine(device: str, threads: int) -> str:
    """CPU model, threads, torch version, GPU name (on CUDA) and the load average when the run started."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    text = f"{cpu}, {os.cpu_count()} CPU threads (torch uses {threads}), torch {torch.__version__}"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(device)}"
    if hasattr(os, "getloadavg"):
        text += f", load average {os.getloadavg()[0]:.1f} at the start (a shared machine)"
    return text


def trained_steps(model_dir: Path) -> dict[str, int]:
    """Steps each stage trained (the last iteration ``train_log.csv`` logs per stage)."""
    with open(model_dir / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["stage"]: int(float(r["iteration"])) for r in rows}


def run(
    splits: list[Split],
    budget: Budget,
    seeds: range,
    work: Path,
    device: str,
    precision: str,
    keep: Callable[[list[dict]], None] = lambda records: None,
) -> list[dict]:
    """Train and evaluate every configuration on every split for ``seeds``; one record per run, the records
    so far given to ``keep`` after each seed. With ``budget.minutes``, the equal-memory, equal-time
    comparison (:func:`equal_memory_sides` per split, :func:`train_timed`); a configuration that cannot
    train in that time is a record with ``refused`` (why) and no scores."""
    records = []
    for split in splits:
        sides = None
        if budget.minutes is not None:
            smallest = min(min(open_volume(pair["image"]).array.shape) for pair in split.train)
            sides = equal_memory_sides(budget, precision, smallest)
            for config, given in sides.items():
                mib = given["activation_bytes"] / 2**20
                print(f"{split.name} {config}: local side {given['patch']} ({mib:.1f} MiB of activations)")
        for seed in seeds:
            folder = work / split.name / f"seed{seed}"
            if sides is None:
                trained = train_configurations(split, budget, seed, folder, device, precision)
            else:
                trained = train_timed(split, budget, sides, seed, folder, device, precision)
            for name, (model_dir, seconds) in trained.items():
                if model_dir is None:
                    nan = [math.nan] * len(split.classes)
                    records.append({
                        "data": split.name, "classes": split.classes, "config": name, "seed": seed,
                        "refused": seconds, "train_seconds": math.nan, "steps": {}, "stage2_kept": False,
                        **sides[name], "dice": nan, "iou": nan, "predict_voxels_per_second": math.nan,
                    })  # fmt: skip
                    continue
                result = evaluate_model(model_dir, split, folder, device, precision)
                record = {
                    "data": split.name,
                    "classes": split.classes,
                    "config": name,
                    "seed": seed,
                    "train_seconds": seconds,
                    "steps": trained_steps(model_dir),
                    "stage2_kept": (model_dir / "stage2.pt").exists(),
                    **(sides or {}).get(name, {}),
                    **result,
                }
                records.append(record)
                print(
                    f"{split.name} seed {seed} {name}: Dice {np.round(result['dice'], 3).tolist()}, "
                    f"train {seconds:.0f} s, steps {record['steps']}",
                    flush=True,
                )
            keep(records)
    return records


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for values of runs that did not train)."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (data, config): mean and standard deviation over seeds of each class's Dice and IoU, of the mean
    foreground Dice, and the mean training seconds and prediction speed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["config"]), []).append(r)
    summary = {}
    for key, runs in groups.items():
        n_classes = len(runs[0]["dice"])
        entry = {"seeds": len(runs), "classes": runs[0]["classes"]}
        for metric in ("dice", "iou"):
            entry[metric] = [_spread([r[metric][c] for r in runs]) for c in range(n_classes)]
        entry["foreground_dice"] = _spread([statistics.fmean(r["dice"][1:]) for r in runs])
        entry["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
        entry["predict_voxels_per_second"] = statistics.fmean(r["predict_voxels_per_second"] for r in runs)
        if "patch" in runs[0]:  # the equal-memory comparison: the side and bytes it was given, steps done
            entry["patch"], entry["activation_bytes"] = runs[0]["patch"], runs[0]["activation_bytes"]
            stages = dict.fromkeys(stage for r in runs for stage in r["steps"])
            entry["steps"] = {st: statistics.fmean(r["steps"].get(st, 0) for r in runs) for st in stages}
            entry["stage2_kept"] = sum(r["stage2_kept"] for r in runs)
            entry["refused"] = next((r["refused"] for r in runs if "refused" in r), None)
        summary[key] = entry
    return summary


def verdicts(summary: dict[tuple[str, str], dict], data: str) -> str:
    """One sentence per baseline: does ``cascade-post`` beat it on mean foreground Dice beyond the seeds'
    spread (difference larger than the root sum of squares of the two standard deviations)? With one seed
    there is no spread, and the sentence says so."""
    post_mean, post_std = summary[(data, "cascade-post")]["foreground_dice"]
    refused = summary[(data, "cascade-post")].get("refused")
    if refused:
        return f"The cascade with post-concatenation does not train in the time given: {refused}."
    one_seed = summary[(data, "cascade-post")]["seeds"] == 1
    parts = []
    for config in CONFIGS[:-1]:
        mean, std = summary[(data, config)]["foreground_dice"]
        if not math.isfinite(mean):
            parts.append(f"cannot be compared with `{config}` (it does not train in the time)")
            continue
        diff, spread = post_mean - mean, (post_std**2 + std**2) ** 0.5
        if one_seed:
            verdict = "scores above" if diff > 0 else "scores below" if diff < 0 else "ties with"
            parts.append(f"{verdict} `{config}` ({diff:+.3f} mean foreground Dice)")
            continue
        verdict = (
            "beats" if diff > spread else "loses to" if diff < -spread else "ties with (within the spread)"
        )
        parts.append(f"{verdict} `{config}` ({diff:+.3f} mean foreground Dice, spread {spread:.3f})")
    caveat = " One seed only: differences of a few hundredths may be noise." if one_seed else ""
    return "The cascade with post-concatenation " + "; ".join(parts) + "." + caveat


def _pm(value: tuple[float, float]) -> str:
    mean, std = value
    return "-" if not np.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"


def results_table(
    summary: dict[tuple[str, str], dict], data: str, memory: list[dict], checkpointing: bool
) -> Table:
    """Dice and IoU per foreground class, mean foreground Dice, training time, prediction speed and the
    memory of one training step (see :func:`bench_name`), one row per configuration. In the equal-memory
    comparison, the local side and activation bytes each configuration was given and the steps it trained
    in its minutes (per stage; a cascade's stage 2 kept in how many seeds) instead of the peak."""
    by_bench = {r["config"]: r for r in memory}
    classes = summary[(data, CONFIGS[0])]["classes"]
    timed = "patch" in summary[(data, CONFIGS[0])]
    header = [
        "configuration",
        *(["local patch"] if timed else []),
        *(f"Dice {c}" for c in classes[1:]),
        *(f"IoU {c}" for c in classes[1:]),
        "mean fg Dice",
        "train min",
        "predict Mvox/s",
        "activation MiB",
        "steps" if timed else "peak MiB",
    ]
    rows = []
    for config in CONFIGS:
        s, step = summary[(data, config)], by_bench[bench_name(config, checkpointing)]
        if timed:
            seeds = s["seeds"]
            steps = ", ".join(f"stage {stage}: {n:.0f}" for stage, n in s["steps"].items())
            kept = f" (stage 2 kept {s['stage2_kept']}/{seeds})" if config.startswith("cascade") else ""
            last, activation = steps + kept, s["activation_bytes"]
            if s["refused"]:
                last = "does not train in the time: " + s["refused"].split(": ", 1)[-1]
        else:
            peak, activation = step["peak_bytes"], step["activation_bytes"]
            last = "-" if peak is None else f"{peak / 2**20:,.1f}"
        rows.append([
            config,
            *([_sides(config, s["patch"])] if timed else []),
            *(_pm(v) for v in s["dice"][1:]),
            *(_pm(v) for v in s["iou"][1:]),
            _pm(s["foreground_dice"]),
            _number(s["train_seconds"] / 60, 1),
            _number(s["predict_voxels_per_second"] / 1e6, 2),
            f"{activation / 2**20:,.1f}",
            last,
        ])  # fmt: skip
    return Table(header, rows)


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _sides(config: str, side: int) -> str:
    """The patch a configuration of the equal-memory comparison trains on, with its field of view."""
    if config == "unet-fov":
        return f"{context_side(side)}^3 (the view of {side}^3)"
    return f"{side}^3" if config == "unet-local" else f"{side}^3, context {context_side(side)}^3"


def _paragraph(text: str) -> str:
    """``text`` on one line (source paragraphs are wrapped)."""
    return " ".join(text.split())


INTRO = [
    _paragraph("""
        Five configurations of [method.md](method.md) section 6, trained with the same widths, batch and
        number of steps per stage, over several seeds, and evaluated on held-out volumes with
        `meunet.infer.predict` (Gaussian-blended sliding windows, window = context side, 50 % overlap):
        `unet-local` (plain 3D U-net on the local patch), `unet-fov` (plain U-net on the whole 1.5x context
        field of view at full resolution), `meunet` (stage 1 alone), `cascade-pre` and `cascade-post` (that
        meU-net, frozen, plus a stage-2 U-net fed by pre- or post-concatenation). The cascades train twice
        the steps (stage 1, then stage 2), and their training time includes stage 1's. Dice and IoU are
        pooled over the test volumes of a run, then given as mean ± standard deviation over the seeds; 'mean
        fg Dice' is the mean over the foreground classes. The best weights of each stage are chosen on the
        validation volume.
    """),
    _paragraph("""
        Memory columns: one training step of the configuration (forward, W_D loss, backward) measured by
        `meunet.memory` ([method.md](method.md) section 7): activation bytes are the tensors saved for
        backward (exact); peak is the step's peak memory above the built model (CPU: peak RSS of a fresh
        subprocess; CUDA: `max_memory_allocated`). The full memory table below also lists the U-nets with
        checkpointing.
    """),
    _paragraph("""
        Produced by `benchmarks/paper_table.py`; every number below is measured, with the command and machine
        given. Regenerate this page from the JSON files with `--report-only`.
    """),
]


def plot_dice(summary: dict[tuple[str, str], dict], title: str, path: Path) -> Path:
    """Bar chart (PNG) of the mean foreground Dice per configuration, one group of bars per data set, error
    bars one standard deviation over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(data for data, _ in summary))
    width = 0.8 / len(CONFIGS)
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    for i, config in enumerate(CONFIGS):
        means, stds = zip(*(summary[(d, config)]["foreground_dice"] for d in datasets), strict=True)
        positions = [k + (i - (len(CONFIGS) - 1) / 2) * width for k in range(len(datasets))]
        ax.bar(positions, means, width, yerr=stds, capsize=3, label=config)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set(ylabel="mean foreground Dice", ylim=(0, 1), title=title)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(CONFIGS))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def results_markdown(runs: list[dict], images: Path) -> str:
    """``docs/results.md`` from the JSON content of every run (one per ``--data`` / scale); its pictures are
    drawn into ``images``."""
    from meunet.memory import plot_memory
    from meunet.report import Picture

    images.mkdir(parents=True, exist_ok=True)
    sections = [("What is compared", INTRO)]
    if NOTES.exists():  # a person's reading of the numbers, kept beside the JSON files
        sections.append(("What the numbers say", [NOTES.read_text().strip()]))
    for result in runs:
        budget = result["budget"]
        summary = summarize(result["records"])
        stem = f"paper_table_{file_name(result['name'])}"
        memory_png = images / f"{stem}_memory.png"
        plot_memory(result["memory"], memory_png)
        checkpointing = "on" if budget["checkpointing"] else "off"
        if result.get("meunet_checkpointing"):  # runs before 2026-12-02 trained every network alike
            checkpointing = f"{checkpointing} for the U-nets, on for the meU-net and the cascades"
        if budget.get("minutes") is None:
            size = (
                f"local patch {budget['patch']}^3, context {result['context']}^3, {budget['iterations']} "
                f"steps per stage with {budget['validations']} validations"
            )
        else:
            size = (
                f"each configuration the largest local patch whose training step keeps at most "
                f"{budget['activation_mib']:g} MiB of activations (every stage of a cascade; counted on "
                f"`meta`) and {budget['minutes']:g} minutes of wall time for its whole training command "
                f"(`training.time_budget`: a cascade's stage 1, out-of-fold folds, stage-1 cache and stage 2 "
                f"included; the steps and validations planned to fill it)"
            )
        setting = (
            f"Command: `{result['command']}` ({result['date']}). Machine: {result['machine']}. "
            f"Budget: widths {budget['widths']}, {size}, batch {budget['batch']}, checkpointing "
            f"{checkpointing}, {result['precision']} on {result['device']}; seeds {result['seeds']}."
        )
        blocks = [setting] + ([REAL_NOTE] if result["data"] == "real" else [])
        datasets = list(dict.fromkeys(r["data"] for r in result["records"]))
        for data in datasets:
            if len(datasets) > 1:
                blocks.append(f"Scan `{data}` (classes {', '.join(summary[(data, CONFIGS[0])]['classes'])}):")
            blocks += [
                results_table(summary, data, result["memory"], budget["checkpointing"]),
                verdicts(summary, data),
            ]
        name = "" if result["name"] == result["data"] else f" ({result['name']})"
        dice_png = plot_dice(summary, TITLES[result["data"]] + name, images / f"{stem}.png")
        blocks.append(Picture(dice_png, "Mean foreground Dice per configuration (± 1 s.d. over seeds)"))
        sections.append((TITLES[result["data"]] + name, blocks))
        memory = [memory_table(result["memory"]), Picture(memory_png, "Memory of one training step")]
        sections.append((f"Memory of one training step{name}", memory))
    if THRESHOLD.exists():
        sections.append(("Real scans against a threshold", [THRESHOLD.read_text().strip()]))
    return markdown_report("Results: the paper's comparison, measured", sections, ROOT / "docs")


REAL_NOTE = _paragraph("""
    Real scans from `../shared/data/real`, each cut into its 2 x 2 x 2 disjoint blocks: ranked by foreground
    fraction, the second tests, the third validates, the other six train. The labels are silver, not manual:
    a median filter, multi-Otsu thresholds and an opening. A score says how well a network reproduces that
    algorithm on real microCT texture, not how well it would match a human annotator.
""")


def write_results(path: Path) -> None:
    """Rewrite ``path`` (docs/results.md) from every ``benchmarks/results/paper_table_*.json``."""
    order = {"synthetic": 0, "real": 1}
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("paper_table_*.json"))]
    runs.sort(key=lambda r: (r["name"].startswith("paper-scale"), order.get(r["data"], 2)))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(results_markdown(runs, path.parent / "images"))
    os.replace(tmp, path)
    print(f"wrote {path}")


def _plan(budget: Budget, precision: str, data: str) -> None:
    """Print what a run needs: activation memory per configuration (exact, on ``meta``) and the data size."""
    records = measure_memory(StepSetting(budget.patch, 1.5, budget.batch, budget.widths, precision, "meta"))
    print(f"budget: {budget}")
    for r in records:
        print(f"  {r['config']:<20} activation {r['activation_bytes'] / 2**30:7.2f} GiB per training step")
    if data == "synthetic":
        n = sum(budget.volumes)
        size = 2 * n * int(np.prod(budget.shape)) / 2**30
        print(f"synthetic data: {n} volumes of {budget.shape}, {size:.2f} GiB on disk (image + labels)")


def training_hours(memory: list[dict], budget: Budget, seeds: int, splits: int) -> float:
    """Hours of training steps (validation and prediction not included) from measured one-step times."""
    step = {r["config"]: r["step_seconds"] for r in memory}
    per_seed = budget.iterations * sum(step[bench_name(c, budget.checkpointing)] for c in CONFIGS)
    return per_seed * seeds * splits / 3600


def file_name(name: str) -> str:
    """The name as a file name (``synthetic at 100 MiB, 5 min``: ``synthetic_at_100_MiB_5_min``)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name)


def merged(result: dict, path: Path) -> dict:
    """``result`` with the records of an earlier run in ``path`` of the same budget, precision and device
    whose seeds it did not run (a comparison split over several commands; each command's line is kept)."""
    if not path.exists():
        return {**result, "seeds": len({r["seed"] for r in result["records"]})}
    earlier = json.loads(path.read_text())
    same = ("budget", "precision", "device", "data")
    if any(json.loads(json.dumps(result[k])) != earlier.get(k) for k in same):
        print(f"{path} holds another budget: replaced", file=sys.stderr)
        return {**result, "seeds": len({r["seed"] for r in result["records"]})}
    ran = {r["seed"] for r in result["records"]}
    records = [r for r in earlier["records"] if r["seed"] not in ran] + result["records"]
    records.sort(key=lambda r: (r["data"], r["seed"]))
    join = {
        k: "; ".join(dict.fromkeys([*earlier[k].split("; "), result[k]]))
        for k in ("command", "date", "machine")
    }
    return {**result, **join, "records": records, "seeds": len({r["seed"] for r in records})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds FIRST .. FIRST+SEEDS-1, merged into an earlier run's JSON",
    )
    parser.add_argument(
        "--budget-mib", type=float, default=None, help="equal memory: activation MiB per step"
    )
    parser.add_argument("--minutes", type=float, default=None, help="equal time: minutes per configuration")
    parser.add_argument(
        "--iterations", type=int, default=None, help="steps per stage (default: the budget's)"
    )
    parser.add_argument("--validations", type=int, default=None, help="validations per stage")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="synthetic volume Z Y X")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--paper-scale", action="store_true", help="paper widths, 160^3 / 240^3 (for a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite --results from the JSON files"
    )
    args = parser.parse_args()
    if args.report_only:
        write_results(args.results)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if (args.budget_mib is None) != (args.minutes is None):
        parser.error("--budget-mib and --minutes go together (the equal-memory, equal-time comparison)")
    torch.set_num_threads(args.threads)
    budget = PAPER_SCALE if args.paper_scale else Budget()
    budget = replace(
        budget,
        iterations=args.iterations or budget.iterations,
        validations=args.validations or budget.validations,
        shape=tuple(args.shape or budget.shape),
        activation_mib=args.budget_mib,
        minutes=args.minutes,
    )
    if args.device == "cpu" and args.paper_scale:
        print("warning: paper scale on a CPU takes days; use --device cuda", file=sys.stderr)
    _plan(budget, args.precision, args.data)
    bench_device = "cuda" if args.device.startswith("cuda") else "cpu"
    memory = measure_memory(
        StepSetting(budget.patch, 1.5, budget.batch, budget.widths, args.precision, bench_device)
    )
    n_splits = 1 if args.data == "synthetic" else len(REAL_SCANS)
    if budget.minutes is not None:
        hours = budget.minutes * len(CONFIGS) * args.seeds * n_splits / 60
        print(f"about {hours:.1f} h of training (plus prediction)")
    else:
        hours = training_hours(memory, budget, args.seeds, n_splits)
        print(
            f"measured one-step times: about {hours:.1f} h of training steps (plus validation and prediction)"
        )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    started = time.strftime("%Y-%m-%d %H:%M")
    host = machine(args.device, args.threads)
    with tempfile.TemporaryDirectory(prefix="paper_table_") as tmp:
        work = args.work or Path(tmp)
        splits = [synthetic_split(work, budget)] if args.data == "synthetic" else real_splits(work)
        name = f"{'paper-scale ' if args.paper_scale else ''}{args.data}"
        if budget.minutes is not None:
            name += f" at {budget.activation_mib:g} MiB, {budget.minutes:g} min"
        out = RESULTS / f"paper_table_{file_name(name)}.json"
        result = {
            "name": name,
            "data": args.data,
            "command": " ".join([".venv/bin/python benchmarks/paper_table.py", *sys.argv[1:]]),
            "date": started,
            "machine": host,
            "device": args.device,
            "precision": args.precision,
            "budget": asdict(budget),
            "context": budget.context,
            "meunet_checkpointing": True,
            "memory": memory,
        }

        def keep(records: list[dict]) -> None:  # after every seed, so that a stopped run keeps its seeds
            nonlocal result
            RESULTS.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{out}.lock"):  # another command may be running other seeds of this comparison
                result = merged({**result, "records": records}, out)
                tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(result, indent=1) + "\n")
                os.replace(tmp, out)
            print(f"wrote {out}", flush=True)

        run(splits, budget, seeds, work, args.device, args.precision, keep)
    records = result["records"]
    summary = summarize(records)
    for data in dict.fromkeys(r["data"] for r in records):
        table = results_table(summary, data, memory, budget.checkpointing)
        print(f"\n{data}\n" + "\n".join(" | ".join(row) for row in [table.header, *table.rows]))
        print(verdicts(summary, data))
    write_results(args.results)


if __name__ == "__main__":
    main()
