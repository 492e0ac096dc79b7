"""``train_log.csv`` (one row per validation) and ``curves.png`` (training loss and validation Dice)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from meunet.errors import InputError
from meunet.io import atomic_output

BASE_COLUMNS = ["stage", "iteration", "epoch", "loss", "local_loss", "context_loss", "seconds", "it_per_s"]


class TrainLog:
    """Rows of the training log, rewritten whole (temporary name, rename) after each append.

    Columns: stage, iteration, epoch (patches seen / kept patches), loss, local_loss, context_loss (mean
    training losses since the previous row; context_loss empty for stage 2), seconds (wall time of the stage
    so far, validations included), it_per_s (training steps per second since the previous row, validation
    excluded), ``dice_<class>`` per class and ``mean_foreground_dice`` on the validation volumes.
    """

    def __init__(self, path: Path, classes: list[str]) -> None:
        self.path = path
        self.dice_columns = [f"dice_{c}" for c in classes]
        self.columns = [*BASE_COLUMNS, *self.dice_columns, "mean_foreground_dice"]
        self.rows: list[dict[str, str]] = []
        if path.exists():
            self.rows = self._read(path)

    def _read(self, path: Path) -> list[dict[str, str]]:
        """The rows of an earlier run's log; one this class did not write is one :class:`InputError`."""
        fix = "restore it, or start over with --force"
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader, [])
                rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as e:
            raise InputError(path, f"not a meunet training log ({e}): {fix}") from None
        if header != self.columns:
            columns = ", ".join(self.columns)
            raise InputError(path, f"its columns are not those of this run ({columns}): {fix}")
        for line, row in enumerate(rows, start=2):
            try:
                if len(row) != len(header) or not (int(row[0]) >= 1 and int(row[1]) >= 0):
                    raise ValueError
                [float(v) for v in row[2:] if v]
            except ValueError:
                raise InputError(path, f"line {line} is not a row of a meunet training log: {fix}") from None
        return [dict(zip(header, row, strict=True)) for row in rows]

    def keep_until(self, stage: int, iteration: int) -> None:
        """Drop rows of ``stage`` after ``iteration`` and rows of later stages (work no checkpoint holds)."""
        self.rows = [
            r
            for r in self.rows
            if int(r["stage"]) < stage or (int(r["stage"]) == stage and int(r["iteration"]) <= iteration)
        ]

    def append(self, row: dict[str, float], dice: np.ndarray) -> None:
        """Add one row (missing values are left empty) with the Dice (C,) per class, and rewrite the file."""
        row = {**row, **dict(zip(self.dice_columns, dice.tolist(), strict=True))}
        self.rows.append({k: "" if row.get(k) is None else f"{row[k]:.6g}" for k in self.columns})
        with atomic_output(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self, path: Path) -> None:
        """Draw ``curves.png``: training losses (left) and validation Dice per class (right) by iteration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for stage in sorted({r["stage"] for r in self.rows}):
            rows = [r for r in self.rows if r["stage"] == stage]
            x = np.array([float(r["iteration"]) for r in rows])
            for key in ("loss", "context_loss"):
                y = np.array([float(r[key]) if r[key] else np.nan for r in rows])
                if np.isfinite(y).any():
                    left.plot(x, y, marker=".", label=f"stage {stage} {key.replace('_', ' ')}")
            for key in self.columns[len(BASE_COLUMNS) :]:
                y = np.array([float(r[key]) if r[key] else np.nan for r in rows])
                right.plot(
                    x, y, marker=".", label=f"stage {stage} {key.removeprefix('dice_').replace('_', ' ')}"
                )
        left.set(xlabel="iteration", ylabel="training loss (W_D)", title="training loss")
        right.set(xlabel="iteration", ylabel="Dice", ylim=(0, 1), title="validation Dice")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
