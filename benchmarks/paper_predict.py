"""Paper-size prediction of a two-stage model: time, peak RSS and (on CUDA) peak GPU memory.

Builds a post-concatenation cascade of fixed random weights (a meU-net stage 1 and a U-net stage 2, 3
classes, instance norm, the given widths, storing a cubic ``--window``), writes a random uint8 volume of
``--shape`` (default the paper's 1072 x 470 x 470) as ``.npy`` and predicts it to Zarr through
:func:`meunet.infer.predict` in this process, with the model's window, ``--device`` and ``--precision``.
Random weights: the figures are time and memory, not accuracy. Prints one line and writes JSON.

    .venv/bin/python benchmarks/paper_predict.py [--device cuda] [--precision auto] [--shape 1072 470 470]
        [--window 240] [--widths 16 32 64 128 128] [--stages 2] [--json paper_predict.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_vs_monai import _make_model
from meunet.infer import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--shape", type=int, nargs=3, default=[1072, 470, 470], metavar=("Z", "Y", "X"))
    parser.add_argument("--window", type=int, default=240)
    parser.add_argument("--widths", type=int, nargs=5, default=[16, 32, 64, 128, 128])
    parser.add_argument("--stages", type=int, default=2, choices=[1, 2])
    parser.add_argument("--json", type=Path, default=Path("paper_predict.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meunet-paper-") as tmp:
        model = _make_model(Path(tmp) / "model", args.window, tuple(args.widths), "instance", args.stages)
        image = Path(tmp) / "image.npy"
        volume = np.lib.format.open_memmap(image, "w+", np.uint8, tuple(args.shape))
        rng = np.random.default_rng(0)
        for z in range(0, args.shape[0], 64):
            volume[z : z + 64] = rng.integers(0, 256, volume[z : z + 64].shape, np.uint8)
        volume.flush()
        del volume
        stats = predict(model, image, Path(tmp) / "labels.zarr", device=args.device,
                        precision=args.precision, progress=False, force=True)  # fmt: skip
    cuda = torch.cuda.is_available() and args.device != "cpu"
    record = {
        **{k: stats[k] for k in ("voxels", "seconds", "peak_rss_bytes", "windows", "window")},
        "shape": args.shape,
        "widths": args.widths,
        "stages": args.stages,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    gpu = "" if not cuda else f", peak GPU {record['peak_gpu_bytes'] / 2**30:.2f} GiB"
    print(f"{record['device']}: {args.stages}-stage widths {args.widths} on {args.shape}, "
          f"window {stats['window']}, {stats['windows']} windows: {stats['seconds']:.1f} s, peak RSS "
          f"{stats['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}")  # fmt: skip
    args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
