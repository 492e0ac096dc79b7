"""Streaming I/O benchmark: write a paper-sized volume in slabs to each format, then read it back by slabs.

Each step runs in a fresh subprocess, which reports its wall time and peak resident set size (RSS); a
subprocess that only imports meunet.io and the format libraries gives the baseline. Prints a table and writes
JSON.

    .venv/bin/python benchmarks/io_stream.py [--shape 1072 470 470] [--slab 16] [--json io_stream.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ["a.npy", "a.nii", "a.nii.gz", "a.tif", "a.zarr", "a.mha", "slices"]


def _child(step: str, path: str, shape: tuple[int, int, int], slab: int) -> dict:
    import numpy as np

    import meunet.io._itk
    import meunet.io._nifti
    import meunet.io._tiff
    import meunet.io._zarr  # noqa: F401  (import cost belongs to the baseline)
    from meunet.io import create_writer, open_volume, value_range

    start = time.perf_counter()
    if step == "write":
        plane = ((np.arange(shape[1])[:, None] + np.arange(shape[2]) // 3) % 251).astype(np.uint8)
        with create_writer(path, shape, np.uint8) as writer:
            for z0 in range(0, shape[0], slab):
                shift = (np.arange(z0, min(z0 + slab, shape[0])) * 7 % 251).astype(np.uint8)
                writer.write(z0, plane + shift[:, None, None])
    elif step == "read":
        value_range(open_volume(path).array)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run(step: str, path: Path, shape, slab: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        step,
        str(path),
        "--shape",
        *map(str, shape),
        "--slab",
        str(slab),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[1072, 470, 470], metavar=("Z", "Y", "X"))
    parser.add_argument("--slab", type=int, default=16, help="slices per written slab")
    parser.add_argument("--json", type=Path, default=Path("io_stream.json"))
    parser.add_argument("--child", nargs=2, metavar=("STEP", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], shape, args.slab)))
        return
    volume_mib = shape[0] * shape[1] * shape[2] / 2**20
    rows = [{"format": "(imports only)", "step": "baseline", **_run("baseline", Path("-"), shape, args.slab)}]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for name in FORMATS:
            path = Path(tmp) / name
            for step in ("write", "read"):
                rows.append({"format": name, "step": step, **_run(step, path, shape, args.slab)})
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"volume {shape} uint8 = {volume_mib:.0f} MiB, {args.slab}-slice slabs written, 64 MiB read")
    print(f"{'format':<16}{'step':<10}{'seconds':>9}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['format']:<16}{r['step']:<10}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.0f}")
    args.json.write_text(
        json.dumps({"shape": shape, "slab": args.slab, "volume_mib": volume_mib, "rows": rows}, indent=1)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
