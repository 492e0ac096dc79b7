"""Prediction against its forward floor: how much of ``meunet predict`` is not the network's forward passes.

The floor is the time of the run's forward passes alone: the same number of windows, one per pass, through
the same network and precision on random normalised input, nothing read, blended or written. Each row runs
in a fresh subprocess: the floor, ``meunet.infer.predict`` in-process (model load, reading, blending, argmax,
writing), and the ``meunet predict`` command (adding Python's and torch's start-up) for inputs and outputs
of several formats. The network is the default one (meU-net, widths 16..128, instance norm, 3 classes, fixed
random weights), windows 96^3 at overlap 0.5 by default. Prints a table (time / floor per row) and writes
JSON.

    .venv/bin/python benchmarks/predict_floor.py [--shape 128 256 256] [--window 96] [--overlap 0.5]
        [--precisions auto fp32] [--inputs npy nii.gz tif] [--outputs zarr nii.gz] [--threads 2]
        [--json predict_floor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_vs_monai import _make_model, _make_volume

DEFAULT_WIDTHS = (16, 32, 64, 128, 128)


def _child(kind: str, model: str, image: str, output: str, args) -> dict:
    import torch

    from meunet.infer import SlidingWindow, predict
    from meunet.models import load_model_dir
    from meunet.precision import autocast, resolve_precision

    torch.set_num_threads(args.threads)
    window = (args.window,) * 3
    start = time.perf_counter()
    if kind == "floor":
        net = load_model_dir(model).net  # eval mode, as predict runs it
        precision = resolve_precision(args.precision, "cpu")
        n_windows = 1
        for starts in SlidingWindow(window, overlap=args.overlap).grid(tuple(args.shape)):
            n_windows *= len(starts)
        x = torch.randn(1, 1, *window)
        with torch.inference_mode(), autocast(precision, "cpu"):
            net(x)  # warm-up, not timed: the first pass chooses oneDNN's kernels
            start = time.perf_counter()
            for _ in range(n_windows):
                net(x).float().numpy()
        return {"seconds": time.perf_counter() - start, "windows": n_windows, "precision": precision}
    if kind == "predict":
        stats = predict(
            model, image, output, window=window, overlap=args.overlap, precision=args.precision,
            progress=False, force=True,
        )  # fmt: skip
        return {"seconds": time.perf_counter() - start, "windows": stats["windows"]}
    command = [
        sys.executable,
        "-m",
        "meunet",
        "predict",
        model,
        image,
        output,
        "--window",
        *[str(w) for w in window],
    ]
    command += ["--overlap", str(args.overlap), "--precision", args.precision, "--no-progress", "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, check=True, capture_output=True, env=env)
    return {"seconds": time.perf_counter() - start}


def _run(kind: str, model: Path, image: Path, output: Path, args, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(model), str(image), str(output)]
    cmd += ["--shape", *map(str, args.shape), "--window", str(args.window), "--overlap", str(args.overlap)]
    cmd += ["--precisions", precision, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], metavar=("Z", "Y", "X"))
    parser.add_argument("--window", type=int, default=96, help="cubic window side")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--inputs", nargs="+", default=["npy", "nii.gz", "tif"], help="input formats")
    parser.add_argument("--outputs", nargs="+", default=["zarr", "nii.gz"], help="output formats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every subprocess")
    parser.add_argument(
        "--json", type=Path, default=Path("predict_floor.json"), help="rewritten after each row"
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("KIND", "MODEL", "IMAGE", "OUTPUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        args.precision = args.precisions[0]
        print(json.dumps(_child(*args.child, args)))
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        model = _make_model(tmp / "model", args.window, widths=DEFAULT_WIDTHS, norm="instance")
        first = _make_volume(tmp / "image.npy", tuple(args.shape))
        images = {"npy": first}
        for fmt in args.inputs:
            if fmt not in images:
                from meunet.io import open_volume, write_volume

                images[fmt] = tmp / f"image.{fmt}"
                write_volume(images[fmt], open_volume(first))
        for precision in args.precisions:
            floor = _run("floor", model, first, tmp / "-", args, precision)
            runs = [("floor", "-", "-", floor)]
            for kind in ("predict", "cli"):
                pairs = [(fmt, args.outputs[0]) for fmt in args.inputs] if kind == "predict" else []
                pairs += [(args.inputs[0], out) for out in args.outputs[1:]] if kind == "predict" else []
                pairs += [(args.inputs[0], args.outputs[0])] if kind == "cli" else []
                for fmt, out in pairs:
                    result = _run(kind, model, images[fmt], tmp / f"labels.{out}", args, precision)
                    runs.append((kind, fmt, out, result))
            for kind, fmt, out, result in runs:
                row = {"run": kind, "precision": floor["precision"], "input": fmt, "output": out, **result}
                row["over_floor"] = row["seconds"] / floor["seconds"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            document = {
                "settings": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
                "rows": rows,
            }
            args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    print(f"{'run':<9}{'precision':<11}{'input':<8}{'output':<8}{'windows':>8}{'seconds':>9}{'x floor':>9}")
    for r in rows:
        windows = r.get("windows", "-")
        print(
            f"{r['run']:<9}{r['precision']:<11}{r['input']:<8}{r['output']:<8}{windows:>8}"
            f"{r['seconds']:>9.1f}{r['over_floor']:>9.3f}"
        )


if __name__ == "__main__":
    main()
