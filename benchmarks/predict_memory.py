"""The peak memory ``meunet predict`` estimates against the peak it reaches, per window, width and precision.

Every run is a fresh subprocess that builds nothing but what ``meunet predict`` builds: it predicts a random
uint8 volume with a meU-net of fixed random weights (3 classes, instance norm, the given widths) stored with
the run's window, through :func:`meunet.infer.predict` with that window (``force=True``: the estimate never
stops a run), and reports the estimate the run printed (``estimated_peak_bytes``) and the peak resident set
size of the whole process (``VmHWM``: interpreter, torch, model, buffers and activations), its wall time and
its windows. Each subprocess runs with the allocator settings the ``meunet`` program starts with
(``meunet.allocator.GLIBC_TUNABLES``) and one torch thread unless told otherwise.

Parts:

- ``table``: windows (default 48 96 160 240) x widths (narrow 8..64, default 16..128) x precisions (fp32
  bf16), each on a volume of 1.5 x window deep and one window wide (two windows along z, so the engine
  shifts its accumulator once).
- ``window``: one window of the default network (a volume exactly one window large), the before/after
  figure of the lean inference path; run the script with ``PYTHONPATH`` pointing at another checkout's
  ``src`` to measure that code (the children use whatever ``meunet`` the script imports).
- ``issue``: the case of issue 19, a 240 x 256 x 256 volume with 240³ windows of the default network (4
  windows).
- ``budget``: the ``meunet`` program itself (``python -m meunet.cli predict``, its own allocator settings,
  ``--precision`` as given, default ``auto``) on a volume of ``--budget-shape`` (default 240 x 256 x 256;
  the paper's is 1072 x 470 x 470) with the default network storing a ``--window`` window, once per
  ``--memory-gib`` of ``--budgets``: the window it chose, its estimate, its peak RSS and time, and the share
  of voxels whose labels equal those of the run with the stored window (run with ``--window`` if no budget
  chose it). The weights are random, so the agreement only shows how much the window changes the network's
  output, not what a trained model's labels would do.

    .venv/bin/python benchmarks/predict_memory.py [--parts table window issue budget]
        [--windows 48 96 160 240]
        [--widths narrow default] [--precisions fp32 bf16] [--window 240] [--budgets 1.5 8]
        [--budget-shape 240 256 256] [--budget-precision auto] [--threads 1] [--json FILE]

Prints a table and writes JSON (default benchmarks/results/predict_memory.json, rewritten after each run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_vs_monai import _make_model

WIDTHS = {"narrow": (8, 16, 32, 64, 64), "default": (16, 32, 64, 128, 128)}
RESULTS = Path(__file__).resolve().parent / "results" / "predict_memory.json"


def _child(model: str, image: str, output: str, window: int, precision: str) -> dict:
    import psutil

    from meunet.infer import predict
    from meunet.memory import peak_rss_bytes

    resident = psutil.Process().memory_info().rss
    start = time.perf_counter()
    stats = predict(
        model, image, output, window=(window,) * 3, precision=precision, force=True, progress=False
    )
    return {
        "seconds": time.perf_counter() - start,
        "windows": stats["windows"],
        "resident_before_mib": resident / 2**20,
        "estimate_mib": stats["estimated_peak_bytes"] / 2**20,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
    }


def _make_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, shape, dtype=np.uint8))
    return path


def _run(model: Path, image: Path, output: Path, window: int, precision: str, threads: int) -> dict:
    from meunet.allocator import GLIBC_TUNABLES

    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, "OMP_NUM_THREADS": str(threads)}
    here = str(Path(__file__).resolve().parent)
    call = f"_child({str(model)!r}, {str(image)!r}, {str(output)!r}, {window}, {precision!r})"
    code = (
        f"import json, sys, torch; torch.set_num_threads({threads}); sys.path.insert(0, {here!r}); "
        f"from predict_memory import _child; print(json.dumps({call}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli(model: Path, image: Path, output: Path, options: list[str], threads: int) -> dict:
    """``meunet predict`` as the program runs it; its stats, and the window line it printed."""
    stats = output.with_suffix(".json")
    cmd = [sys.executable, "-m", "meunet.cli", "predict", str(model), str(image), str(output)]
    cmd += ["--stats-json", str(stats), *options]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # the program sets its own
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"meunet predict failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(x for x in done.stderr.splitlines() if x.startswith("meunet predict:"))
    return {**json.loads(stats.read_text()), "line": line.removeprefix("meunet predict: ")}


def _agreement(a: Path, b: Path) -> float:
    """Share of voxels with equal labels in two label volumes, slab by slab."""
    from meunet.io import open_volume

    x, y = open_volume(a).array, open_volume(b).array
    equal = sum(int((x[z : z + 64] == y[z : z + 64]).sum()) for z in range(0, x.shape[0], 64))
    return equal / (x.shape[0] * x.shape[1] * x.shape[2])


def _budget_runs(args, tmp: Path, record) -> None:
    model = _make_model(tmp / "model", args.window, WIDTHS["default"], norm="instance")
    image = _make_volume(tmp / "image.npy", tuple(args.budget_shape))
    precision = ["--precision", args.budget_precision]
    runs = {}
    for gib in sorted(args.budgets, reverse=True):
        runs[gib] = _cli(
            model, image, tmp / f"labels_{gib}.zarr", [*precision, "--memory-gib", str(gib)], args.threads
        )
    reference = next((g for g, r in runs.items() if r["window"] == [args.window] * 3), None)
    if reference is None:
        window = [str(args.window)] * 3
        options = [*precision, "--window", *window, "--force"]
        runs["stored"] = _cli(model, image, tmp / "labels_stored.zarr", options, args.threads)
        reference = "stored"
    for gib, stats in runs.items():
        agreement = _agreement(tmp / f"labels_{gib}.zarr", tmp / f"labels_{reference}.zarr")
        record(
            {
                "part": "budget",
                "budget_gib": gib,
                "shape": args.budget_shape,
                "precision": args.budget_precision,
                "widths": "default",
                "window": stats["window"][0],
                "windows": stats["windows"],
                "seconds": stats["seconds"],
                "peak_rss_mib": stats["peak_rss_bytes"] / 2**20,
                "estimate_mib": stats["estimated_peak_bytes"] / 2**20,
                "agreement": agreement,
                "line": stats["line"],
            }
        )


def _budget_note(row: dict) -> str:
    if "agreement" not in row:
        return ""
    return f"  --memory-gib {row['budget_gib']:g}, labels as the stored window's: {row['agreement']:.4%}"


def _print_row(row: dict) -> None:
    shape = " x ".join(map(str, row["shape"]))
    over = 100 * (row["estimate_mib"] / row["peak_rss_mib"] - 1)
    print(
        f"{row['part']:<7}{row['widths']:<9}{row['precision']:<6}{row['window']:>6}  {shape:<16}"
        f"{row['windows']:>4}{row['seconds']:>8.1f}{row['peak_rss_mib']:>10.0f}{row['estimate_mib']:>10.0f}"
        f"{over:>+8.1f}%{_budget_note(row)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", choices=["table", "window", "issue", "budget"], default=["table"]
    )
    parser.add_argument("--windows", type=int, nargs="+", default=[48, 96, 160, 240])
    parser.add_argument("--widths", nargs="+", choices=sorted(WIDTHS), default=["narrow", "default"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    parser.add_argument("--window", type=int, default=240, help="side of the 'window' part's window")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 8.0], help="--memory-gib values")
    parser.add_argument("--budget-shape", type=int, nargs=3, default=[240, 256, 256], metavar=("Z", "Y", "X"))
    parser.add_argument("--budget-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every subprocess")
    parser.add_argument("--json", type=Path, default=RESULTS, help="rewritten after each run")
    args = parser.parse_args()
    import meunet
    from meunet.precision import cpu_has_bf16

    settings = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meunet": str(Path(meunet.__file__).parent),
        "cpu": platform.processor() or platform.machine(),
        "cpu_has_bf16": cpu_has_bf16(),
        "date": time.strftime("%Y-%m-%d"),
    }
    plan = []
    if "table" in args.parts:
        plan += [
            ("table", widths, precision, w, (w + w // 2, w, w))
            for widths in args.widths
            for precision in args.precisions
            for w in args.windows
        ]
    if "window" in args.parts:
        plan += [("window", "default", p, args.window, (args.window,) * 3) for p in args.precisions]
    if "issue" in args.parts:
        plan += [("issue", "default", p, 240, (240, 256, 256)) for p in args.precisions]
    rows: list[dict] = []
    print(
        f"{'part':<7}{'widths':<9}{'prec':<6}{'window':>6}  {'shape':<16}{'win':>4}{'s':>8}"
        f"{'peak MiB':>10}{'est. MiB':>10}{'est/peak':>9}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        row["estimate_over_peak"] = row["estimate_mib"] / row["peak_rss_mib"]
        rows.append(row)
        _print_row(row)
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        tmp = Path(tmp)
        for part, widths, precision, window, shape in plan:
            model = _make_model(tmp / "model", window, WIDTHS[widths], norm="instance")
            image = _make_volume(tmp / "image.npy", shape)
            result = _run(model, image, tmp / "labels.zarr", window, precision, args.threads)
            subprocess.run(["rm", "-rf", str(tmp / "labels.zarr")], check=True)
            record({"part": part, "widths": widths, "precision": precision, "window": window,
                    "shape": list(shape), **result})  # fmt: skip
        if "budget" in args.parts:
            _budget_runs(args, tmp, record)


if __name__ == "__main__":
    main()
