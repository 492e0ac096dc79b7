"""Real full and read-only file systems: a small tmpfs, mounted where the tests may mount one (root on
Linux; elsewhere they skip, and tests/test_io_safe.py covers the same errors with a failing ``pwrite``).
Every writing command ends with one line and exit status 2 and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from meunet.io import Volume, write_volume
from test_infer_predict import _model_dir


@pytest.fixture
def small_fs(tmp_path):
    """``mount(kib, read_only)``: a fresh tmpfs of that size under ``tmp_path``, unmounted at the end."""
    mounted = []

    def mount(kib: int, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={kib}k" + (",ro" if read_only else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A random model, a 64 x 64 x 80 image (its labels take 320 KiB) and a tiny training configuration
    whose every planned key is set (so ``train`` prints no plan)."""
    root = tmp_path_factory.mktemp("disk")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (64, 64, 80), dtype=np.uint8)
    image[16:48, 16:48, 20:60] += 100
    write_volume(root / "image.nii", Volume(image))
    write_volume(root / "labels.nii", Volume((image > 80).astype(np.uint8)))
    pair = {"image": str(root / "image.nii"), "label": str(root / "labels.nii")}
    config = {
        "stages": 1,
        "precision": "fp32",
        "data": {"train": [pair], "validation": [pair]},
        "model": {"classes": ["air", "object"], "stage1": "meunet", "widths": [2, 4, 4, 4, 4],
                  "norm": "batch", "checkpointing": False},
        "patch": {"size": 16},
        "training": {"batch_size": 2, "max_iterations": 2, "workers": 0, "progress": False},
        "stage2": {"folds": 2},
    }  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return {"model": _model_dir(root / "model"), "image": root / "image.nii", "config": root / "config.yaml"}


def _meunet(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "meunet", *map(str, args)], capture_output=True, text=True,
                          env=env, check=False, timeout=300)  # fmt: skip


def _commands(inputs: dict[str, Path], out: Path) -> dict[str, tuple]:
    config = yaml.safe_load(inputs["config"].read_text())
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump({**config, "output": str(out / "model")}))
    return {
        "synth": ("synth", "fly", out / "flies", "--count", "1", "--shape", "64", "64", "80", "--format",
                  "nii", "--no-progress"),
        "convert": ("convert", inputs["image"], out / "copy.nii"),
        "predict": ("predict", inputs["model"], inputs["image"], out / "labels.nii", "--no-progress"),
        "predict-mha": ("predict", inputs["model"], inputs["image"], out / "labels.mha", "--no-progress"),
        "train": ("train", out.parent / f"{out.name}.yaml"),
        "demo": ("demo", "--out", out / "demo", "--quick", "--no-progress"),
    }  # fmt: skip


@pytest.mark.parametrize("command", ["synth", "convert", "predict", "predict-mha", "train"])
def test_a_full_disk_is_one_line_and_leaves_nothing(small_fs, inputs, command):
    out = small_fs(64)
    result = _meunet(*_commands(inputs, out)[command])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr, result.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == []


@pytest.mark.parametrize("command", ["synth", "convert", "predict", "train", "demo"])
def test_a_read_only_folder_is_one_line_and_leaves_nothing(small_fs, inputs, command):
    out = small_fs(64, read_only=True)
    result = _meunet(*_commands(inputs, out)[command])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Read-only file system" in result.stderr, result.stderr
