"""How well the plan's estimates hold: ``meunet train CONFIG --time-budget T``, then the printed estimates
(duration of each phase and of the whole run, peak memory of a training step) against what the run took.

Trains in this process (the model directory is replaced), from the time the command would start. Peak memory
measured: CUDA ``torch.cuda.max_memory_allocated`` over the whole run; CPU the peak resident set size above
the resident set before training (Linux ``VmHWM``; it holds far more than one step: the volumes' caches,
oneDNN buffers, the prediction's slabs). Phase durations: the last ``seconds`` logged per stage
(``train_log.csv``, ``stage1_cache/fold<f>_log.csv``), which include their validations. Prints a table and
writes JSON and the table (Markdown) next to each other.

    .venv/bin/python benchmarks/plan_accuracy.py CONFIG.yaml --time-budget 10m \\
        [--json benchmarks/results/plan_accuracy.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import torch

from meunet.memory import peak_rss_bytes
from meunet.train import load_config, train
from meunet.train.config import parse_duration


def _last_seconds(log: Path, stage: str) -> float | None:
    """The last ``seconds`` of ``stage``'s rows in a training log, or None."""
    if not log.exists():
        return None
    rows = [r for r in csv.DictReader(log.open()) if r["stage"] == stage]
    return float(rows[-1]["seconds"]) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--time-budget", required=True)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/plan_accuracy.json"))
    args = parser.parse_args()
    budget = parse_duration(args.time_budget)
    config = load_config(args.config)
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"time_budget": budget})}
    )
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    before = peak_rss_bytes()
    started = time.monotonic()
    out = train(config, force=True, started=started)
    wall = time.monotonic() - started
    plan = json.loads((out / "model.json").read_text())["plan"]
    measured_peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - before
    logs = {"stage 1": (out / "train_log.csv", "1"), "stage 2": (out / "train_log.csv", "2")}
    logs.update({f"fold {f}": (out / "stage1_cache" / f"fold{f}_log.csv", "1") for f in range(10)})
    rows = []
    for name, phase in plan["stages"].items():
        measured = _last_seconds(*logs[name]) if name in logs else None
        rows.append({"phase": name, "planned_s": phase["seconds"], "measured_s": measured})
    estimated_peak = max(p.get("peak_bytes", 0) for p in plan["stages"].values())
    record = {
        "config": str(args.config),
        "budget_s": budget,
        "planned_s": plan["seconds"],
        "measured_s": wall,
        "phases": rows,
        "estimated_step_peak_bytes": estimated_peak,
        "measured_peak_bytes": measured_peak,
        "peak_measure": "cuda max_memory_allocated" if cuda else "peak RSS above the RSS before training",
        "plan": {k: v["value"] for k, v in plan["keys"].items()},
        "device": plan["device"],
        "machine": {"platform": platform.platform(), "load_average_end": os.getloadavg()},
    }
    lines = [
        f"plan accuracy: {args.config}, budget {budget:.0f} s, {plan['device']['name']}",
        "",
        "| phase | planned s | measured s | measured / planned |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if not (r["measured_s"] and r["planned_s"]) else f"{r['measured_s'] / r['planned_s']:.2f}"
        measured = "-" if r["measured_s"] is None else f"{r['measured_s']:.0f}"
        lines.append(f"| {r['phase']} | {r['planned_s']:.0f} | {measured} | {ratio} |")
    lines.append(f"| whole command | {plan['seconds']:.0f} | {wall:.0f} | {wall / plan['seconds']:.2f} |")
    lines.append("")
    lines.append(f"whole command {wall:.0f} s for a budget of {budget:.0f} s ({wall / budget:.1%})")
    mib = 2**20
    lines.append(
        f"peak: estimated {estimated_peak / mib:.0f} MiB per training step, "
        f"measured {measured_peak / mib:.0f} MiB ({record['peak_measure']})"
    )
    table = "\n".join(lines)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
