"""Training on two CPU processes (gloo) against one: the same samples and random draws, the same weights,
exact resumption after a killed process, and what is refused before any process starts."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import meunet
from meunet.models import load_model_dir
from meunet.synth import generate_dataset
from meunet.train import parse_config, train

SRC = Path(meunet.__file__).resolve().parents[1]
LEARNING_RATE = 9e-4
RUNNING_VAR_SCALE = 10  # a running variance is compared relative to 10 times itself: see _differences

# Run by torchrun: the runs of the configurations given, in one process group (one start for several runs).
RUNS = """
import sys
import time
import torch.distributed as dist
from meunet.train import load_config, train

dist.init_process_group("gloo")
for path in sys.argv[1:]:
    train(load_config(path))
dist.destroy_process_group()
"""

# Imported at start-up by every process of `meunet train --nproc 2` (a sitecustomize on PYTHONPATH):
# process 1 is killed (SIGKILL) right after the second validation.
DYING = """
import os, signal
from meunet import ddp

on_main, validations = ddp.on_main, []

def dying(step):
    result = on_main(step)
    if getattr(step, "__name__", "") == "validate":
        validations.append(1)
        if len(validations) == 2 and ddp.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return result

ddp.on_main = dying
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data"), "fly", count=3, shape=(32, 32, 32), fmt="nii")


def _config(dataset: Path, output: Path, norm: str = "batch", **training) -> dict:
    """Stage 1 for 6 steps of batch 4, validated every 2; with instance norm, on 32^3 patches (all kept)."""
    return {
        "output": str(output),
        "stages": 1,
        "precision": "fp32",
        "data": {"dataset": str(dataset)},
        "model": {"widths": [2, 4, 4, 4, 4], "norm": norm, "checkpointing": True},
        "patch": {"size": 16} if norm == "batch" else {"size": 32, "background_keep": 1.0},
        "training": {
            "batch_size": 4,
            "max_iterations": 6,
            "validate_every": 2,
            "progress": False,
            "learning_rate": LEARNING_RATE,
            **training,
        },
        # every sample may be warped, flipped and get noise: each process must draw for the whole batch
        "augmentation": {"affine_probability": 0.5, "intensity_probability": 0.5},
    }


def _yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2)


def _run(*args, path: tuple[Path, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process with this meunet (and ``path`` first on ``PYTHONPATH``), one
    thread per process (two cores here)."""
    pythonpath = os.pathsep.join(map(str, (*path, SRC)))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


def _checkpoint(output: Path) -> dict:
    return torch.load(output / "checkpoint_stage1.pt", weights_only=True)


def _losses(output: Path) -> list[float]:
    with (output / "train_log.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _cancelled(output: Path) -> set[str]:
    """State-dict keys a norm cancels: the bias of a convolution followed by a norm (its gradient is zero up
    to rounding, so Adam moves it by the sign of noise) and the running mean that follows it."""
    keys = set()
    for prefix, module in load_model_dir(output).stage1.named_modules():
        children = list(module.named_children())
        for (a, conv), (b, norm) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv3d) and isinstance(norm, (nn.BatchNorm3d, nn.InstanceNorm3d)):
                keys |= {f"{prefix}.{a}.bias", f"{prefix}.{b}.running_mean"}
    return keys


def _differences(a: Path, b: Path) -> torch.Tensor:
    """Differences of every weight element that no norm cancels, between two runs' checkpoints: absolute for
    the learned weights; for the running variances of batch norm, relative to RUNNING_VAR_SCALE times their
    value. A variance averages squared activations, so its relative difference is about twice that of the
    weights before it (3e-4 after the 6 steps here: 1.3e-4 on a variance of 0.32)."""
    first, second = _checkpoint(a)["net"], _checkpoint(b)["net"]
    cancelled = _cancelled(a)
    differences = []
    for k in first:
        if k in cancelled or not first[k].is_floating_point():
            continue
        difference = (first[k].double() - second[k].double()).abs()
        if k.endswith("running_var"):
            difference = difference / (RUNNING_VAR_SCALE * first[k].double().abs())
        differences.append(difference.flatten())
    return torch.cat(differences)


def _same_stream(a: Path, b: Path) -> None:
    """The two runs consumed the same samples and random numbers, and logged the same losses."""
    first, second = _checkpoint(a), _checkpoint(b)
    assert first["progress"]["iteration"] == second["progress"]["iteration"]
    assert first["progress"]["position"] == second["progress"]["position"]
    assert torch.equal(first["generator"], second["generator"])
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-4)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """Two-process runs (batch norm: 6 steps of batch 4, 2 per process; instance norm: a step of batch 2, 1
    per process) and the same runs on one process."""
    tmp = tmp_path_factory.mktemp("runs")
    configs = {
        "batch": _config(dataset, tmp / "batch_two"),
        "instance": _config(dataset, tmp / "instance_two", "instance", batch_size=2, max_iterations=1),
    }
    (tmp / "runs.py").write_text(RUNS)
    paths = [_yaml(config, tmp / f"{name}.yaml") for name, config in configs.items()]
    result = _run(*TORCHRUN, tmp / "runs.py", *paths)
    assert result.returncode == 0, result.stderr
    for name, config in configs.items():
        train(parse_config({**config, "output": str(tmp / f"{name}_one")}, "cfg"))
    return {name: tmp / name for name in ("batch_two", "batch_one", "instance_two", "instance_one", "")}


def test_two_processes_write_the_model_directory(runs):
    two = runs["batch_two"]
    for name in ("model.json", "stage1.pt", "checkpoint_stage1.pt", "train_log.csv", "curves.png"):
        assert (two / name).exists(), name
    logged = [row.split(",")[1] for row in (two / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == ["2", "4", "6"]
    assert load_model_dir(two).meta["train_config"]["training"]["batch_size"] == 4  # the global batch


def test_two_processes_of_batch_2_equal_one_of_batch_4(runs):
    _same_stream(runs["batch_one"], runs["batch_two"])
    assert _differences(runs["batch_one"], runs["batch_two"]).max() < 1e-4


def test_instance_norm_on_two_processes_equals_one(runs):
    one, two = runs["instance_one"], runs["instance_two"]
    _same_stream(one, two)
    # Instance norm over the 2^3 bottleneck of a 32^3 patch is ill-conditioned: float32 gradients differ
    # from float64 ones by up to 1e-3 (relative), one process or two, and Adam amplifies that over steps.
    # One step: the gradients (Adam's first moment) agree to that, and so the weights, but for the few whose
    # gradient is at that level: Adam's first step is the learning rate times the sign of the gradient.
    moments = [
        torch.cat([s["exp_avg"].flatten() for s in _checkpoint(run)["optimizer"]["state"].values()])
        for run in (one, two)
    ]
    assert (moments[0] - moments[1]).norm() < 1e-2 * moments[0].norm()
    differences = _differences(one, two)
    assert (differences > 1e-4).double().mean() < 1e-2 and differences.max() < 2 * LEARNING_RATE * 1.01


def test_a_killed_process_resumes_exactly_on_two_processes_or_on_one(runs, dataset):
    tmp = runs[""]
    killed = tmp / "killed"
    path = _yaml(_config(dataset, killed), tmp / "killed.yaml")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(DYING)
    result = _run("-m", "meunet", "train", path, "--nproc", 2, path=(tmp / "hook",))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1:] == [
        "error: process 1: stopped (signal SIGKILL), and the others with it; the last checkpoint is kept: "
        "--resume continues"
    ]
    assert "Traceback" not in result.stderr
    stopped = _checkpoint(killed)["progress"]["iteration"]
    assert stopped in (2, 4)  # the second validation's checkpoint, unless torchrun stopped rank 0 first
    shutil.copytree(killed, tmp / "killed_one")
    # what rank 0 leaves when the launcher stops it while it writes a checkpoint: resuming drops it
    (killed / ".checkpoint_stage1.99999-0123abcd.tmp.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    result = _run("-m", "meunet", "train", path, "--resume", "--nproc", 2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"model directory: {killed}"]  # rank 0 alone speaks
    assert not list(killed.glob(".*.tmp.pt"))
    assert _differences(runs["batch_two"], killed).max() < 1e-6
    # the checkpoint holds the state of the global batch: one process may continue it
    train(parse_config(_config(dataset, tmp / "killed_one"), "cfg"), resume=True)
    _same_stream(runs["batch_one"], tmp / "killed_one")
    assert _differences(runs["batch_one"], tmp / "killed_one").max() < 1e-4


def test_a_batch_the_processes_cannot_share_is_one_line(dataset, tmp_path, cli, monkeypatch):
    path = _yaml(_config(dataset, tmp_path / "out", batch_size=3), tmp_path / "odd.yaml")
    expected = [
        "error: training.batch_size: 3 is the global batch: 2 processes cannot share it evenly "
        "(make it a multiple of 2)"
    ]
    result = cli("train", path, "--nproc", 2)
    assert result.exit_code == 2 and result.stderr.splitlines() == expected
    for rank, lines in ((0, expected), (1, [])):  # under torchrun: the same check, said by rank 0 alone
        for name, value in (("WORLD_SIZE", 2), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", 2)):
            monkeypatch.setenv(name, str(value))
        result = cli("train", path)
        assert result.exit_code == 2 and result.stderr.splitlines() == lines
    assert not (tmp_path / "out").exists()


def test_processes_without_their_gpus_or_with_a_time_budget_are_one_line(dataset, tmp_path, cli):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    config = {**_config(dataset, tmp_path / "out"), "device": "cuda"}
    result = cli("train", _yaml(config, tmp_path / "cuda.yaml"), "--nproc", 2)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: device: ")
    result = cli(
        "train",
        _yaml(_config(dataset, tmp_path / "out"), tmp_path / "c.yaml"),
        "--nproc",
        2,
        "--time-budget",
        "10m",
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: training.time_budget: ")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_planned_batch_is_planned_per_process(dataset, tmp_path, monkeypatch):
    from meunet import ddp
    from meunet.train import pipeline
    from meunet.train.data import resolve_split

    config = parse_config({"output": str(tmp_path / "out"), "data": {"dataset": str(dataset)}}, "cfg")
    split, cpu = resolve_split(config), torch.device("cpu")
    alone, plan = pipeline._plan(config, split, cpu, time.monotonic())
    monkeypatch.setattr(ddp, "world_size", lambda: 2)
    shared, _ = pipeline._plan(config, split, cpu, time.monotonic())
    assert alone.training.batch_size == plan.value("training.batch_size")  # fits one device
    assert shared.training.batch_size == 2 * alone.training.batch_size  # the global batch of two
