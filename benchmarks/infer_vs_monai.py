"""Streaming prediction (meunet.infer.predict) against MONAI's sliding_window_inference: time and peak memory.

Both run the same narrow UNet3D (fixed random weights, widths 8..64, 3 classes), window, overlap and Gaussian
blending (sigma = window / 8) on the same synthetic uint8 volumes, with one window per forward pass. Each
measurement runs in a fresh subprocess that reports its wall time and peak resident set size (RSS); a
subprocess that only imports meunet and torch and loads the model gives the baseline (MONAI's import adds to
its rows). Ours reads the input
slab by slab from a .npy file and writes Zarr labels; MONAI gets the normalised volume as one float32 tensor
(its interface) and its labels are saved to .npy. Two depths show how memory grows with the volume; a
paper-size run (1072 x 470 x 470 by default) shows ours at scale. Every subprocess, ours and MONAI's alike,
runs with ``meunet.allocator.GLIBC_TUNABLES``, what the ``meunet`` program uses where transparent huge pages
are on (``--allocator meunet``, the default), or with glibc's defaults (``--allocator glibc``). Prints a table
and writes JSON.

    .venv/bin/python benchmarks/infer_vs_monai.py [--yx 256 256] [--depths 128 256] [--window 96]
        [--overlap 0.5] [--paper 1072 470 470] [--paper-overlap 0.5] [--parts compare paper] [--threads 2]
        [--allocator meunet|glibc] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTHS = (8, 16, 32, 64, 64)


def _child(kind: str, model_dir: str, image: str, output: str, window: int, overlap: float) -> dict:
    import numpy as np
    import torch

    from meunet.data.normalization import Normalization
    from meunet.infer import predict
    from meunet.models import load_model_dir

    bundle = load_model_dir(model_dir)
    start = time.perf_counter()
    record: dict = {}
    if kind == "ours":
        stats = predict(
            model_dir,
            image,
            output,
            window=(window,) * 3,
            overlap=overlap,
            precision="fp32",
            progress=False,
            force=True,
        )  # fp32 as on MONAI's side; force: the estimate never stops a measurement
        record = {"windows": stats["windows"], "estimated_peak_mib": stats["estimated_peak_bytes"] / 2**20}
    elif kind == "monai":
        from monai.inferers import sliding_window_inference

        normalization = Normalization.from_dict(bundle.meta["normalization"])
        x = torch.from_numpy(normalization.apply(np.load(image)))[None, None]
        with torch.inference_mode():
            logits = sliding_window_inference(
                x, (window,) * 3, 1, bundle.net, overlap=overlap, mode="gaussian", sigma_scale=0.125
            )
            np.save(output, logits.argmax(1)[0].to(torch.uint8).numpy())
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **record,
    }


def _run(kind: str, model_dir: Path, image: Path, output: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(model_dir), str(image), str(output)]
    cmd += ["--window", str(args.window), "--overlap", str(args.overlap), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if args.allocator == "meunet":
        from meunet.allocator import GLIBC_TUNABLES

        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _make_model(path: Path, window: int, widths=WIDTHS, norm: str = "batch", stages: int = 1) -> Path:
    """A meU-net of fixed random weights (3 classes) stored with a cubic ``window``; with ``stages=2`` a
    post-concatenation cascade on it (also used by predict_memory.py and paper_predict.py)."""
    import torch

    from meunet.data.normalization import Normalization
    from meunet.models import Cascade, MeUNet, UNet3D, save_model_dir

    torch.manual_seed(0)
    stage1 = MeUNet(1, 3, widths=widths, norm=norm)
    stage2 = Cascade(stage1, UNet3D(1, 3, widths=widths, norm=norm)) if stages == 2 else None
    meta = {
        "classes": ["background", "gut", "crop"],
        "normalization": Normalization(0.0, 255.0, 128.0, 64.0).to_dict(),
        "window": [window] * 3,
    }
    return save_model_dir(path, meta, stage1, stage2, force=True)


def _make_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """Random uint8 volume with some structure, written slab by slab."""
    import numpy as np

    from meunet.io import create_writer

    rng = np.random.default_rng(0)
    with create_writer(path, shape, np.uint8) as writer:
        for z0 in range(0, shape[0], 32):
            depth = min(32, shape[0] - z0)
            writer.write(z0, rng.integers(0, 256, (depth, *shape[1:]), dtype=np.uint8))
    return path


def _summary(rows: list[dict]) -> dict:
    """RSS growth between the two depths, and throughput ours / MONAI at each depth (compare part only)."""
    growth = {}
    for kind in ("ours", "monai"):
        peaks = [r["peak_rss_mib"] for r in rows if r["run"] == kind]
        if len(peaks) == 2:
            growth[kind] = peaks[1] - peaks[0]
    ours = [r for r in rows if r["run"] == "ours"]
    monai = [r for r in rows if r["run"] == "monai"]
    return {
        "rss_growth_mib": growth,
        "growth_ratio": growth["ours"] / growth["monai"]
        if len(growth) == 2 and growth["monai"] > 0
        else None,
        "throughput_ratio": [
            o["voxels_per_second"] / m["voxels_per_second"] for o, m in zip(ours, monai, strict=False)
        ],
    }


def _print_table(rows: list[dict], summary: dict) -> None:
    columns = f"{'seconds':>9}{'Mvox/s':>9}{'peak RSS MiB':>14}{'estimate MiB':>14}"
    print(f"{'run':<20}{'shape (z, y, x)':<20}{columns}")
    for row in rows:
        shape = " x ".join(map(str, row["shape"])) if row["shape"] else "-"
        speed = f"{row['voxels_per_second'] / 1e6:.3f}" if "voxels_per_second" in row else "-"
        estimate = f"{row['estimated_peak_mib']:.0f}" if "estimated_peak_mib" in row else "-"
        print(
            f"{row['run']:<20}{shape:<20}{row['seconds']:>9.1f}{speed:>9}{row['peak_rss_mib']:>14.0f}{estimate:>14}"
        )
    growth = summary["rss_growth_mib"]
    if len(growth) == 2:
        print(
            f"peak RSS growth between the depths: ours {growth['ours']:.0f} MiB, "
            f"MONAI {growth['monai']:.0f} MiB; "
            "throughput ours / MONAI: " + ", ".join(f"{t:.2f}" for t in summary["throughput_ratio"])
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yx", type=int, nargs=2, default=[256, 256], metavar=("Y", "X"))
    parser.add_argument("--depths", type=int, nargs=2, default=[128, 256], metavar=("Z1", "Z2"))
    parser.add_argument("--window", type=int, default=96, help="cubic window side")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--paper", type=int, nargs=3, default=[1072, 470, 470], metavar=("Z", "Y", "X"))
    parser.add_argument("--paper-overlap", type=float, default=0.5, help="overlap of the paper-size run")
    parser.add_argument(
        "--parts", nargs="+", choices=["compare", "paper"], default=["compare", "paper"],
        help="compare: ours and MONAI at the two depths; paper: ours at paper size",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every subprocess")
    parser.add_argument(
        "--allocator", choices=["meunet", "glibc"], default="meunet",
        help="glibc allocator settings of every subprocess: the meunet program's, or glibc's defaults",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=Path("infer_vs_monai.json"), help="rewritten after each run"
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("KIND", "MODEL", "IMAGE", "OUTPUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_child(*args.child, args.window, args.overlap)))
        return
    settings = {**{k: v for k, v in vars(args).items() if k not in ("json", "child")}, "widths": WIDTHS}
    rows: list[dict] = []

    def record(run: str, shape, result: dict, **extra) -> None:
        row = {"run": run, "shape": shape, **extra, **result}
        if shape is not None:
            row["voxels_per_second"] = shape[0] * shape[1] * shape[2] / row["seconds"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        document = {"settings": settings, "rows": rows, "summary": _summary(rows)}
        args.json.write_text(json.dumps(document, indent=1) + "\n")

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        model = _make_model(tmp / "model", args.window)
        shapes = [(depth, *args.yx) for depth in args.depths] if "compare" in args.parts else []
        image = _make_volume(tmp / "image.npy", shapes[0] if shapes else tuple(args.paper))
        record("baseline", None, _run("baseline", model, image, tmp / "-", args))
        for i, shape in enumerate(shapes):
            image = image if i == 0 else _make_volume(tmp / f"image{i}.npy", shape)
            for kind in ("ours", "monai"):
                output = tmp / f"{kind}{i}.{'zarr' if kind == 'ours' else 'npy'}"
                record(kind, list(shape), _run(kind, model, image, output, args))
            image.unlink()
        if "paper" in args.parts:
            image = _make_volume(tmp / "paper.npy", tuple(args.paper))
            paper_args = argparse.Namespace(**{**vars(args), "overlap": args.paper_overlap})
            result = _run("ours", model, image, tmp / "paper.zarr", paper_args)
            record("ours (paper size)", list(args.paper), result, overlap=args.paper_overlap)
    _print_table(rows, _summary(rows))


if __name__ == "__main__":
    main()
