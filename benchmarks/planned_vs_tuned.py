"""A planned run against the hand-tuned one, at the same time budget.

For one data set, two configurations train side by side with ``meunet train CONFIG --time-budget T`` (one
process each, ``OMP_NUM_THREADS`` = ``--threads``, so that both see the same machine):

- ``planned``: output, data and class names only (as ``examples/fly_planned.yaml``): every other key planned.
- ``tuned`` (``--against tuned``, the default): the model, patch, training, augmentation and stage2 sections
  of ``examples/fly_synth.yaml`` (the budget stops it where its 400 steps per stage would not fit);
- ``unet`` (``--against unet``): the planned configuration with ``model.stage1: unet``, a plain U-net in
  place of the meU-net, everything else planned (whether a CPU plan should use one); ``--against
  unet-stage1`` also sets ``stages: 1`` (the plain U-net alone, no cascade); ``--against meunet`` sets
  ``model.stage1: meunet`` (since a CPU plan chooses the plain U-net, the meU-net against it).

Data: ``--data synthetic-fly``, the synthetic fly set of ``examples/fly_synth.yaml`` (six flies 192 x 96 x
96, seed 0, the last validating) with two held-out flies of seed 1; ``--data SCAN``, a real label map
re-acquired with exact labels and cut 40 / 10 / 50 % along z as ``benchmarks/real_vs_threshold.py`` does (fly,
bone, cement, sand, sand3). Each model predicts the held-out volumes (``meunet.infer.predict``); Dice per
class is pooled over them. Prints a table and merges the record into
``benchmarks/results/planned_vs_tuned.json`` (one per data set and budget).

    .venv/bin/python benchmarks/planned_vs_tuned.py --data synthetic-fly --time-budget 10m [--threads 1]
        [--against tuned|unet|unet-stage1|meunet] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from meunet.infer import predict
from meunet.io import open_volume
from meunet.metrics import dice_from_confusion, evaluate_labels
from meunet.synth import generate_dataset
from meunet.train.config import parse_duration
from real_vs_threshold import DERIVED, SCANS, machine, reacquire, split_along_z

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "planned_vs_tuned.json"
TUNED = ROOT / "examples" / "fly_synth.yaml"
TUNED_SECTIONS = ("stages", "model", "patch", "training", "augmentation", "stage2")


def fly_data(work: Path) -> tuple[dict, list[dict], list[str]]:
    """The ``data`` section of the fly set, the held-out pairs, the class names."""
    dataset = generate_dataset(work / "fly_synth", "fly", 6, (192, 96, 96), seed=0, fmt="nii", force=True)
    test = generate_dataset(work / "fly_test", "fly", 2, (192, 96, 96), seed=1, fmt="nii", force=True)
    meta = json.loads(test.read_text())
    pairs = [{k: str(test.parent / v[k]) for k in ("image", "label")} for v in meta["volumes"]]
    return {"dataset": str(dataset), "validation_count": 1}, pairs, meta["classes"]


def scan_data(name: str, work: Path) -> tuple[dict, list[dict], list[str]]:
    """The ``data`` section of a re-acquired scan's training and validation parts, its test part, classes."""
    synth = reacquire(name, work)
    meta = json.loads(synth.read_text())
    image, labels = (open_volume(synth.parent / meta["volumes"][0][k]).array for k in ("image", "label"))
    pairs, _ = split_along_z(np.asarray(image), np.asarray(labels), work / "crops")
    return {"train": [pairs["train"]], "validation": [pairs["validation"]]}, [pairs["test"]], meta["classes"]


def configs(data: dict, classes: list[str], work: Path, against: str) -> dict[str, dict]:
    """The two configuration mappings, by name: ``planned`` and ``against`` (``tuned``, ``unet``,
    ``unet-stage1`` or ``meunet``)."""
    planned = {"output": str(work / "planned"), "data": data, "model": {"classes": classes}}
    if against != "tuned":
        network = "meunet" if against == "meunet" else "unet"
        variant = {**planned, "output": str(work / against), "model": {"classes": classes, "stage1": network}}
        return {
            "planned": planned,
            against: {**variant, **({"stages": "1"} if against == "unet-stage1" else {})},
        }
    tuned = yaml.safe_load(TUNED.read_text())
    hand = {key: tuned[key] for key in TUNED_SECTIONS}
    hand["model"] = {**hand["model"], "classes": classes}
    return {"planned": planned, "tuned": {"output": str(work / "tuned"), "data": data, **hand}}


def train_side_by_side(mappings: dict[str, dict], budget: str, threads: int, work: Path) -> dict[str, float]:
    """Run ``meunet train CONFIG --time-budget budget --force`` for every mapping at once; wall seconds of
    each command (its stderr in ``work/<name>.log``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running = {}
    for name, mapping in mappings.items():
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(mapping, sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "meunet.cli",
            "train",
            str(config),
            "--time-budget",
            budget,
            "--force",
        ]
        log = (work / f"{name}.log").open("w")
        running[name] = (subprocess.Popen(command, env=env, stdout=log, stderr=log), time.monotonic(), log)
    seconds = {}
    for name, (process, started, log) in running.items():
        if process.wait() != 0:
            raise SystemExit(f"{name}: meunet train failed, see {work / f'{name}.log'}")
        seconds[name] = time.monotonic() - started
        log.close()
    return seconds


def score(model: Path, test: list[dict], n_classes: int, work: Path) -> list[float]:
    """Dice per class of ``model`` on the held-out pairs, pooled over them."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    for i, pair in enumerate(test):
        out = work / f"{model.name}_prediction_{i}.npy"
        predict(model, pair["image"], out, progress=False, force=True)
        truth = open_volume(pair["label"]).array
        labels = open_volume(out).array
        confusion += np.asarray(evaluate_labels(labels, truth, n_classes=n_classes)["confusion"])
    return dice_from_confusion(confusion).tolist()


def describe(model: Path) -> dict:
    """What the run kept: stage 2 or not, the steps each stage took (its training log), the configuration
    trained (``max_iterations`` as planned at the start; a budgeted phase plans its steps again as it goes),
    the planned keys (where planned)."""
    meta = json.loads((model / "model.json").read_text())
    plan = meta.get("plan", {}).get("keys", {})
    config = meta["train_config"]
    steps: dict[str, int] = {}
    for row in csv.DictReader((model / "train_log.csv").open()):
        steps[row["stage"]] = max(steps.get(row["stage"], 0), int(row["iteration"]))
    return {
        "stage2_kept": (model / "stage2.pt").exists(),
        "steps": steps,
        "trained": {
            "widths": config["model"]["widths"],
            "norm": config["model"]["norm"],
            "patch": config["patch"]["size"],
            "batch": config["training"]["batch_size"],
            "max_iterations": config["training"]["max_iterations"],
            "stages": config["stages"],
        },
        "planned_keys": sorted(k for k, v in plan.items() if v.get("planned")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, choices=["synthetic-fly", *sorted({**SCANS, **DERIVED})])
    parser.add_argument("--time-budget", required=True, help="e.g. 10m")
    parser.add_argument("--threads", type=int, default=1, help="threads of each training command")
    parser.add_argument(
        "--against",
        choices=["tuned", "unet", "unet-stage1", "meunet"],
        default="tuned",
        help="the second config",
    )
    parser.add_argument("--work", type=Path, help="keep the data and models here (default: a temporary one)")
    args = parser.parse_args()
    budget = parse_duration(args.time_budget)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)) / args.data
        work.mkdir(parents=True, exist_ok=True)
        data, test, classes = fly_data(work) if args.data == "synthetic-fly" else scan_data(args.data, work)
        mappings = configs(data, classes, work, args.against)
        started = datetime.now().isoformat(timespec="minutes")
        seconds = train_side_by_side(mappings, args.time_budget, args.threads, work)
        results = {}
        for name, mapping in mappings.items():
            model = Path(mapping["output"])
            dice = score(model, test, len(classes), work)
            results[name] = {
                "seconds": seconds[name],
                "dice": dice,
                "mean_foreground": float(np.mean(dice[1:])),
                **describe(model),
            }
    record = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "date": started,
        "machine": machine(),
        "budget_seconds": budget,
        "classes": classes,
        "configs": results,
    }
    print(f"\n{args.data}, budget {args.time_budget}, {args.threads} thread(s) each")
    print(f"{'config':<12}{'wall':>8}  {'mean fg':>8}  Dice per class")
    for name, r in results.items():
        dice = np.round(r["dice"], 3).tolist()
        print(f"{name:<12}{r['seconds']:>7.0f}s  {r['mean_foreground']:>8.3f}  {dice}")
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = f"{args.data} {args.time_budget}" + ("" if args.against == "tuned" else f" against {args.against}")
    stored[key] = record
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored, indent=1) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
