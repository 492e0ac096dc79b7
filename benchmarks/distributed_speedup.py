"""Distributed prediction (meunet.distributed) on a local Dask cluster of 1 and 2 worker processes.

One narrow UNet3D (fixed random weights, widths 8..64, 3 classes) predicts one synthetic uint8 Zarr volume
cut into blocks; each worker process is single-threaded (one torch thread). The single-process streaming
prediction (meunet.infer.predict, one torch thread) is the baseline that shows the cost of the blocks'
halo windows. Cluster start-up is timed apart from the prediction (which includes loading the model on each
worker and writing the pyramid). Prints a table and writes JSON.

    .venv/bin/python benchmarks/distributed_speedup.py [--shape 128 96 96] [--window 32]
        [--chunks 32 96 96] [--block 32 96 96] [--workers 1 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

WIDTHS = (8, 16, 32, 64, 64)


def _make_model(path: Path, window: int) -> Path:
    import torch

    from meunet.data.normalization import Normalization
    from meunet.models import MeUNet, save_model_dir

    torch.manual_seed(0)
    meta = {
        "classes": ["background", "gut", "crop"],
        "normalization": Normalization(0.0, 255.0, 128.0, 64.0).to_dict(),
        "window": [window] * 3,
    }
    return save_model_dir(path, meta, MeUNet(1, 3, widths=WIDTHS))


def _make_volume(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> Path:
    import numpy as np

    from meunet.io import create_writer

    rng = np.random.default_rng(0)
    with create_writer(path, shape, np.uint8, chunks=chunks) as writer:
        for z0 in range(0, shape[0], chunks[0]):
            depth = min(chunks[0], shape[0] - z0)
            writer.write(z0, rng.integers(0, 256, (depth, *shape[1:]), dtype=np.uint8))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 96, 96], metavar=("Z", "Y", "X"))
    parser.add_argument("--window", type=int, default=32, help="cubic window side")
    parser.add_argument("--chunks", type=int, nargs=3, default=[32, 96, 96], metavar=("Z", "Y", "X"))
    parser.add_argument("--block", type=int, nargs=3, default=[32, 96, 96], metavar=("Z", "Y", "X"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=Path("distributed_speedup.json"))
    args = parser.parse_args()

    import numpy as np
    import torch
    import zarr

    from meunet.distributed import connect, predict_distributed
    from meunet.infer import predict

    torch.set_num_threads(1)
    shape, voxels = tuple(args.shape), int(np.prod(args.shape))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        model = _make_model(tmp / "model", args.window)
        image = _make_volume(tmp / "image.zarr", shape, tuple(args.chunks))
        start = time.perf_counter()
        stats = predict(model, image, tmp / "single.zarr", progress=False)
        seconds = time.perf_counter() - start
        rows.append({"run": "single process", "workers": 0, "blocks": 1, "windows": stats["windows"],
                     "startup_seconds": 0.0, "seconds": seconds})  # fmt: skip
        expected = zarr.open_group(tmp / "single.zarr", mode="r")["0"][...]
        for n in args.workers:
            start = time.perf_counter()
            with connect(f"local:{n}") as client:
                startup = time.perf_counter() - start
                start = time.perf_counter()
                [stats] = predict_distributed(
                    model, image, tmp / f"dask{n}.zarr", client, chunks=args.chunks, block=args.block,
                    progress=False,
                )  # fmt: skip
                seconds = time.perf_counter() - start
            same = bool((zarr.open_group(tmp / f"dask{n}.zarr", mode="r")["0"][...] == expected).all())
            rows.append({"run": f"dask local:{n}", "workers": n, "blocks": stats["blocks"],
                         "windows": stats["windows"], "startup_seconds": startup, "seconds": seconds,
                         "identical_to_single_process": same})  # fmt: skip
    one = next((r["seconds"] for r in rows if r["workers"] == 1), None)
    for row in rows:
        row["voxels_per_second"] = voxels / row["seconds"]
        row["speedup_vs_1_worker"] = one / row["seconds"] if one else None
    settings = {**{k: v for k, v in vars(args).items() if k != "json"}, "widths": WIDTHS}
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    args.json.write_text(
        json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1) + "\n"
    )
    header = (
        ("blocks", 7),
        ("windows", 9),
        ("start s", 9),
        ("predict s", 11),
        ("Mvox/s", 9),
        ("vs 1 worker", 13),
    )
    print(f"{'run':<16}" + "".join(f"{name:>{width}}" for name, width in header))
    for r in rows:
        speedup = "-" if r["speedup_vs_1_worker"] is None else f"{r['speedup_vs_1_worker']:.2f}"
        print(
            f"{r['run']:<16}{r['blocks']:>7}{r['windows']:>9}{r['startup_seconds']:>9.1f}{r['seconds']:>11.1f}"
            f"{r['voxels_per_second'] / 1e6:>9.3f}{speedup:>13}"
        )


if __name__ == "__main__":
    main()
