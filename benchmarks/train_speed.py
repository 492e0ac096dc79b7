"""Training speed of ``meunet train``: iterations per second of stage 1 and stage 2, the whole loop measured
(lazy patch reads, augmentation on the device, forward, W_D loss, backward, Adam), validation excluded.

Writes ``count`` phantom volumes (random bright balls of two classes in noise, uint8, ``.npy``) to a
temporary folder, trains both stages for ``iterations`` steps each with a validation half-way and one at the
end, and reads ``it_per_s`` of the second half (after warm-up) from ``train_log.csv``. On CUDA it also
reports the peak allocated memory. Prints a table and writes JSON.

With ``--nproc N`` the run is ``meunet train --nproc N`` (N processes sharing the global batch ``--batch``
under DistributedDataParallel: one per GPU, or CPU processes with gloo), started as a subprocess; the
steps per second are rank 0's, of the global batch. Peak memory is then not measured. On a CPU give each
process its share of the cores (``OMP_NUM_THREADS``).

    .venv/bin/python benchmarks/train_speed.py [--widths 8 16 32 64 64] [--patch 48] [--batch 2]
        [--shape 96 96 192] [--iterations 30] [--device cpu] [--precision fp32] [--checkpointing]
        [--workers 0] [--nproc 1] [--json train_speed.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from meunet.io import Volume, write_volume
from meunet.train import parse_config, train


def _balls(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image and labels (0 air, 1 ball, 2 ball core) of a few random balls."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    for _ in range(4):
        centre, radius = rng.uniform(0.2, 0.8, 3) * shape, rng.uniform(0.06, 0.12) * min(shape)
        distance = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) ** 0.5
        labels[distance < radius] = 1
        labels[distance < radius / 2] = 2
    image = (40 + 60 * labels + rng.normal(0, 20, shape)).clip(0, 255).astype(np.uint8)
    return image, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs=5, default=[8, 16, 32, 64, 64])
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 192])
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes sharing the batch (meunet train --nproc)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pairs = []
        for i in range(args.count):
            image, labels = _balls(tuple(args.shape), i)
            write_volume(folder / f"img{i}.npy", Volume(image))
            write_volume(folder / f"lab{i}.npy", Volume(labels))
            pairs.append({"image": f"img{i}.npy", "label": f"lab{i}.npy"})
        config = {
            "output": "model",
            "device": args.device,
            "precision": args.precision,
            "model": {
                "classes": ["background", "ball", "core"],
                "widths": args.widths,
                "checkpointing": args.checkpointing,
            },
            "data": {"train": pairs[:-1], "validation": pairs[-1:]},
            "patch": {"size": args.patch},
            "training": {
                "batch_size": args.batch,
                "max_iterations": args.iterations,
                "validate_every": max(1, args.iterations // 2),
                "workers": args.workers,
                "progress": False,
            },
        }
        begun = time.perf_counter()
        if args.nproc > 1:
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
            command = [sys.executable, "-m", "meunet", "train", "config.yaml", "--nproc", str(args.nproc)]
            subprocess.run(command, cwd=folder, check=True)
        else:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            train(parse_config(config, "benchmark", folder))
        wall = time.perf_counter() - begun
        with (folder / "model" / "train_log.csv").open() as f:
            rows = {r["stage"]: r for r in csv.DictReader(f)}.values()  # the last row of each stage
    cuda = args.device.startswith("cuda") and args.nproc == 1
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    records = [
        {
            "stage": int(r["stage"]),
            "it_per_s": float(r["it_per_s"]),
            "patch": args.patch,
            "context": parse_config(config, "benchmark").patch.context[0],
            "batch": args.batch,
            "widths": args.widths,
            "device": args.device,
            "precision": args.precision,
            "checkpointing": args.checkpointing,
            "workers": args.workers,
            "nproc": args.nproc,
            "torch_threads": torch.get_num_threads(),
            "wall_s": round(wall, 1),
            "peak_cuda_gib": peak,
        }
        for r in rows
    ]
    print(f"{'stage':>5} {'it/s':>7} {'s/it':>7}  patch/context  batch  nproc  widths  device  precision")
    for r in records:
        print(
            f"{r['stage']:>5} {r['it_per_s']:>7.2f} {1 / r['it_per_s']:>7.2f}  {r['patch']}/{r['context']}"
            f"  {r['batch']}  {r['nproc']}  {r['widths']}  {r['device']}  {r['precision']}"
        )
    print(f"whole command (data, both stages, validations): {wall:.0f} s")
    if peak is not None:
        print(f"peak CUDA memory allocated over both stages: {peak:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
