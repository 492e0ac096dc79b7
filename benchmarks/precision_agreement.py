"""bf16 against fp32 prediction on trained models: labels' agreement, Dice per precision and time.

Each case is a trained model directory, a test image and its labels (any format meunet reads). Both
precisions run the same model on the same image in this process, one after the other, with the model's
window and post-processing (``meunet.infer.Predictor.labels``); the goal (docs/inference.md) is >= 99.9 % of
voxels equal and mean foreground Dice moving by <= 0.002. bf16 is only meaningful on hardware with native
bf16 (``meunet.precision.cpu_has_bf16`` on a CPU); elsewhere it is emulated and slow. Prints a table and
writes JSON.

    .venv/bin/python benchmarks/precision_agreement.py --case NAME MODEL_DIR IMAGE LABELS [--case ...]
        [--threads 2] [--json benchmarks/results/precision_agreement.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from meunet.infer import Predictor, PredictSettings
from meunet.io import open_volume
from meunet.metrics import confusion_matrix, dice_from_confusion
from meunet.precision import cpu_has_bf16


def measure(model_dir: str, image: str, labels: str) -> dict:
    """Labels of both precisions on one image, their agreement, Dice against ``labels`` and seconds."""
    array = np.asarray(open_volume(image).array)
    truth = np.asarray(open_volume(labels).array)
    record: dict = {"model": model_dir, "image": image, "voxels": int(array.size)}
    predicted = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(model_dir, PredictSettings(device="cpu", precision=precision))
        start = time.perf_counter()
        predicted[precision] = predictor.labels(array)
        n = predictor.n_classes
        dice = dice_from_confusion(confusion_matrix(predicted[precision], truth, n))
        record[precision] = {
            "seconds": time.perf_counter() - start,
            "dice": [float(d) for d in dice],
            "mean_foreground_dice": float(np.nanmean(dice[1:])),
        }
    record["agreement"] = float(np.mean(predicted["fp32"] == predicted["bf16"]))
    record["dice_change"] = record["bf16"]["mean_foreground_dice"] - record["fp32"]["mean_foreground_dice"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=4, action="append", required=True,
                        metavar=("NAME", "MODEL_DIR", "IMAGE", "LABELS"))  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/precision_agreement.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {name: measure(model, image, labels) for name, model, image, labels in args.case}
    heads = ("agree %", "fp32 Dice", "bf16 Dice", "change", "fp32 s", "bf16 s")
    print(f"{'case':<16} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, (9, 10, 10, 8, 7, 7), strict=True)))
    for name, r in rows.items():
        print(f"{name:<16} {100 * r['agreement']:>9.3f} {r['fp32']['mean_foreground_dice']:>10.4f} "
              f"{r['bf16']['mean_foreground_dice']:>10.4f} {r['dice_change']:>+8.4f} "
              f"{r['fp32']['seconds']:>7.1f} {r['bf16']['seconds']:>7.1f}")  # fmt: skip
    machine = {"cpu": platform.processor() or platform.machine(), "native_bf16": cpu_has_bf16(),
               "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    args.json.write_text(json.dumps({"machine": machine, "cases": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
