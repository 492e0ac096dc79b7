"""meunet against a classical threshold on real label maps re-acquired with exact labels.

For each labelled microCT scan in ``../shared/data/real`` (or ``--scan NAME``): the silver labels are
re-acquired with ``meunet synth from-labels`` (class attenuations in the order of the real scan's class
means, image-space scanner model), so the image's labels are exact; the volume is cut along z into 40 %
train, 10 % validation and 50 % test (written as separate volumes); meunet trains both stages on the first two
(:func:`recipe`, varied with ``--set``), predicts the test part (``meunet.infer.predict``), and is scored with
Dice per class against the classical baseline (``meunet.baseline.ThresholdBaseline``: 3x3x3 median, then
multi-Otsu thresholds fitted on the training crop, mapped to the label classes by their mean intensity
there). Prints a table per scan and merges the scan's record into
``benchmarks/results/real_vs_threshold.json`` (so runs of one scan each accumulate).

    .venv/bin/python benchmarks/real_vs_threshold.py [--scan fly|bone|cement|sand|sand3] [--iterations 800]
        [--seeds 1] [--threads 1] [--set key.path=value ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from meunet.baseline import ThresholdBaseline
from meunet.infer import predict
from meunet.io import Volume, read_volume, write_volume
from meunet.metrics import dice_from_confusion, evaluate_labels
from meunet.synth import from_labels
from meunet.train import parse_config, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "real_vs_threshold.json"
REAL = ROOT.parent / "shared" / "data" / "real"
# name: (scan, silver labels) in REAL; class names come from REAL/README.md. Left out: the TotalSegmentator
# CT (30 slices: a 40 % training crop of 12 slices is thinner than the patch; 118 classes, model predictions).
SCANS = {
    "fly": ("qim3d/fly_150x256x256.tif", "qim3d/fly_150x256x256_silver3.tif"),
    "bone": ("qim3d/bone_128x128x128.tif", "qim3d/bone_128x128x128_silver2.tif"),
    "cement": ("qim3d/cement_128x128x128.tif", "qim3d/cement_128x128x128_silver2.tif"),
    "sand": ("pymicro/sand_100x200x200.tif", "pymicro/sand_100x200x200_silver2.tif"),
}
# name: (scan it derives from, classes): a three-phase rock made from the sand's labels, its grains split by a
# distance-transform watershed into two minerals at random (pore 41 %, mineral a 29 %, mineral b 30 %), with
# attenuations from seed 0: windows holding pore and one mineral only test whether the network tells the
# minerals apart by their brightness, which a per-window normalisation could lose.
DERIVED = {"sand3": ("sand", ["pore", "mineral_a", "mineral_b"])}
PARTS = (("train", 0.4), ("validation", 0.1), ("test", 0.5))
STAGES = {"both": ("1", "2"), "1": ("1",), "2": ("2",)}


def recipe(
    train_pair: dict,
    validation_pair: dict,
    classes: list[str],
    output: Path,
    iterations: int = 800,
    seed: int = 0,
) -> dict:
    """The training configuration mapping (``docs/config.md``) of a CPU run: widths 8..64, patch 32 (context
    48), batch 4, ``iterations`` steps per stage validated every ``iterations / 4``, both stages."""
    return {
        "output": str(output),
        "stages": "both",
        "seed": seed,
        "device": "cpu",
        "data": {"train": [train_pair], "validation": [validation_pair]},
        "model": {"classes": classes, "widths": [8, 16, 32, 64, 64], "checkpointing": False},
        "patch": {"size": 32},
        "training": {
            "batch_size": 4,
            "max_iterations": iterations,
            "validate_every": max(1, iterations // 4),
            "progress": False,
        },
    }


def override(mapping: dict, settings: list[str]) -> dict:
    """A copy of ``mapping`` with each ``key.path=value`` set (the value parsed as a YAML scalar)."""
    out = copy.deepcopy(mapping)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {setting!r}: expected key.path=value")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def split_along_z(image: np.ndarray, labels: np.ndarray, work: Path) -> tuple[dict, dict]:
    """Cut (Z, Y, X) ``image`` and ``labels`` along z into :data:`PARTS`, written as ``.npy`` in ``work``;
    returns ({part: {"image", "label"}}, {part: [z0, z1]})."""
    work.mkdir(parents=True, exist_ok=True)
    pairs, ranges, z0 = {}, {}, 0
    for i, (part, fraction) in enumerate(PARTS):
        z1 = len(image) if i == len(PARTS) - 1 else z0 + round(fraction * len(image))
        pairs[part] = {"image": str(work / f"{part}_img.npy"), "label": str(work / f"{part}_lab.npy")}
        write_volume(pairs[part]["image"], Volume(np.ascontiguousarray(image[z0:z1])), force=True)
        write_volume(pairs[part]["label"], Volume(np.ascontiguousarray(labels[z0:z1])), force=True)
        ranges[part], z0 = [z0, z1], z1
    return pairs, ranges


def dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> list[float]:
    """Dice per class of two (Z, Y, X) uint8 label arrays."""
    return dice_from_confusion(
        np.asarray(evaluate_labels(pred, truth, n_classes=n_classes)["confusion"])
    ).tolist()


def machine() -> dict:
    """Cores, load average (1, 5, 15 min; taken when a scan's run ends, so it covers the run), CPU, torch
    version and threads: the wall times depend on all of them."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def two_minerals(labels: np.ndarray) -> np.ndarray:
    """(Z, Y, X) uint8 labels 0 pore, 1 and 2 two minerals: the grains (label 1) of ``labels`` cut by a
    watershed of their distance transform (markers at least 4 voxels apart), each grain given a mineral at
    random (seed 0)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    grain = labels == 1
    distance = ndimage.distance_transform_edt(grain)
    peaks = peak_local_max(distance, min_distance=4, labels=grain.astype(np.int32))
    markers = np.zeros(labels.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    grains = watershed(-distance, markers, mask=grain)
    mineral = np.random.default_rng(0).integers(1, 3, len(peaks) + 1).astype(np.uint8)
    return np.where(grain, mineral[grains], 0).astype(np.uint8)


def reacquire(name: str, work: Path) -> Path:
    """``dataset.json`` of the scan ``name`` re-acquired with exact labels (seed 0) in ``work/synth``."""
    if name in DERIVED:
        source, classes = DERIVED[name]
        labels = work / f"{name}_labels.nii"
        work.mkdir(parents=True, exist_ok=True)
        derived = two_minerals(read_volume(REAL / SCANS[source][1]).array)
        write_volume(labels, Volume(derived), force=True)
        return from_labels(labels, work / "synth", seed=0, fmt="nii", classes=classes, force=True)
    image_path, labels_path = (REAL / p for p in SCANS[name])
    return from_labels(labels_path, work / "synth", image=image_path, seed=0, fmt="nii", force=True)


def run_scan(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Re-acquire, split, train, predict and score one scan; returns its JSON record."""
    seconds: dict = {}
    start = time.perf_counter()
    synth = reacquire(name, work)
    seconds["synth"] = time.perf_counter() - start
    meta = json.loads(synth.read_text())
    classes = meta["classes"]
    image, labels = (read_volume(work / "synth" / meta["volumes"][0][k]).array for k in ("image", "label"))
    pairs, ranges = split_along_z(image, labels, work / "crops")
    del image, labels
    start = time.perf_counter()
    train_image, train_labels = (read_volume(pairs["train"][k]).array for k in ("image", "label"))
    test_image, test_labels = (read_volume(pairs["test"][k]).array for k in ("image", "label"))
    baseline = ThresholdBaseline.fit(train_image, train_labels, len(classes))
    baseline_dice = dice(baseline.predict(test_image), test_labels, len(classes))
    seconds["baseline"] = time.perf_counter() - start
    runs = []
    for seed in range(args.seeds):
        model = work / f"model_seed{seed}"
        mapping = override(
            recipe(pairs["train"], pairs["validation"], classes, model, args.iterations, seed), args.set
        )
        times = {}
        for stage in STAGES[str(mapping["stages"])]:
            begin = time.perf_counter()
            train(parse_config({**mapping, "stages": stage}, f"recipe (stage {stage})"), force=stage == "1")
            times[f"stage{stage}"] = time.perf_counter() - begin
        begin = time.perf_counter()
        predict(
            model, pairs["test"]["image"], work / f"prediction_seed{seed}.npy", progress=False, force=True
        )
        times["predict"] = time.perf_counter() - begin
        scores = dice(read_volume(work / f"prediction_seed{seed}.npy").array, test_labels, len(classes))
        runs.append({"seed": seed, "dice": scores, "seconds": times})
        print(f"{name} seed {seed}: Dice {np.round(scores, 3).tolist()}, {times}", flush=True)
    meunet_dice = np.mean([r["dice"] for r in runs], axis=0).tolist()
    return {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "date": datetime.now().isoformat(timespec="minutes"),
        "machine": machine(),
        "classes": classes,
        "attenuation": meta["parameters"]["attenuation"],
        "split_z": ranges,
        "recipe": {**mapping, "output": None, "data": None},
        "overrides": args.set,
        "seconds": seconds,
        "runs": runs,
        "meunet_dice": meunet_dice,
        "baseline_dice": baseline_dice,
        "difference": [m - b for m, b in zip(meunet_dice, baseline_dice, strict=True)],
        "mean_foreground": {
            "meunet": float(np.mean(meunet_dice[1:])),
            "baseline": float(np.mean(baseline_dice[1:])),
        },
    }


def print_table(name: str, record: dict) -> None:
    """Per class: meunet Dice (mean over seeds), baseline Dice, their difference; then the foreground mean."""
    print(f"\n{name} ({len(record['runs'])} seed(s), test slices {record['split_z']['test']})")
    print(f"{'class':<18}{'meunet':>9}{'baseline':>10}{'diff':>9}")
    rows = zip(
        record["classes"], record["meunet_dice"], record["baseline_dice"], record["difference"], strict=True
    )
    for cls, m, b, d in rows:
        print(f"{cls[:17]:<18}{m:>9.3f}{b:>10.3f}{d:>+9.3f}")
    fg = record["mean_foreground"]
    gain = fg["meunet"] - fg["baseline"]
    print(f"{'mean foreground':<18}{fg['meunet']:>9.3f}{fg['baseline']:>10.3f}{gain:>+9.3f}")


def merge_results(records: dict[str, dict], path: Path = RESULTS) -> None:
    """Add ``records`` (scan name -> record) to the JSON at ``path``, replacing those scans' earlier ones."""
    results = json.loads(path.read_text()) if path.exists() else {"scans": {}}
    results["scans"].update(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", choices=sorted({**SCANS, **DERIVED}), help="one scan (default: all)")
    parser.add_argument("--iterations", type=int, default=800, help="training steps per stage")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0 .. N-1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    parser.add_argument(
        "--work", type=Path, help="keep the data and models here (default: a temporary folder)"
    )
    args = parser.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"real scans not found at {REAL}")
    torch.set_num_threads(args.threads)
    for name in [args.scan] if args.scan else [*SCANS, *DERIVED]:
        with tempfile.TemporaryDirectory() as tmp:
            record = run_scan(name, args, (args.work or Path(tmp)) / name)
        print_table(name, record)
        merge_results({name: record})
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
