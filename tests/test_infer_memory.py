"""The window chosen for a memory budget: the choice as a pure function of an estimate, the estimate, the
refusal of a given window that does not fit, and ``--memory-gib`` end to end on a tiny model."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from meunet.errors import InputError
from meunet.infer import (
    Predictor,
    PredictSettings,
    choose_window,
    memory_budget,
    peak_bytes,
    predict,
    window_candidates,
)
from meunet.io import open_volume
from test_infer_predict import KILLER, _image, _model_dir
from test_infer_window import _one_torch_thread  # noqa: F401 (autouse fixture: one torch thread here too)

predict_module = importlib.import_module("meunet.infer.predict")  # the package's ``predict`` is the function
RESIDENT = 300 << 20  # this process's resident memory, as the estimates see it here (fixed: deterministic)
SHAPE = (48, 128, 128)


class _Process:
    """psutil.Process with a fixed resident set size."""

    def memory_info(self):
        return type("Info", (), {"rss": RESIDENT})()


@pytest.fixture(autouse=True)
def fixed_resident(monkeypatch):
    monkeypatch.setattr(predict_module.psutil, "Process", _Process)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny model of test_infer_predict with a stored window of 48³."""
    path = _model_dir(tmp_path_factory.mktemp("memory") / "model")
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**meta, "window": [48, 48, 48]}))
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return _image(tmp_path_factory.mktemp("image") / "image.npy", shape=SHAPE)


def _estimate(model: Path, window, shape=SHAPE) -> int:
    return Predictor(model).window_for(shape, np.uint8, window=window).estimate


def _between(model: Path, shape=SHAPE) -> float:
    """A budget (GiB) that 32³ windows fit and 48³ windows do not, for a volume of ``shape``."""
    small, large = _estimate(model, (32, 32, 32), shape), _estimate(model, (48, 48, 48), shape)
    assert small < large
    return (small + large) / 2 / 2**30


# -- the choice, a pure function of the estimate ------------------------------------------------------------
def test_candidates_step_by_16_up_to_the_stored_window():
    assert window_candidates((240, 240, 240)) == [(n, n, n) for n in range(16, 241, 16)]
    assert window_candidates((50, 50, 50)) == [(16, 16, 16), (32, 32, 32), (48, 48, 48), (50, 50, 50)]
    assert window_candidates((96, 40, 64))[-3:] == [(64, 40, 64), (80, 40, 64), (96, 40, 64)]
    assert window_candidates((16, 16, 16)) == [(16, 16, 16)]


@pytest.mark.parametrize("stored", [(240, 240, 240), (96, 40, 64), (50, 50, 50)])
@pytest.mark.parametrize("budget", [0, 16**3, 40**3, 100**3, 10**9])
def test_choose_window_is_the_largest_candidate_within_the_budget(stored, budget):
    calls = []

    def estimate(window):  # a fake estimate: the window's voxels
        calls.append(window)
        return int(np.prod(window))

    chosen = choose_window(stored, estimate, budget)
    candidates = window_candidates(stored)
    fitting = [w for w in candidates if np.prod(w) <= budget]
    assert chosen == (fitting[-1] if fitting else None)
    if chosen is not None:
        assert all(c <= s for c, s in zip(chosen, stored, strict=True))  # never above the stored window
        assert all(c % 16 == 0 or c == s for c, s in zip(chosen, stored, strict=True))  # valid sizes
    assert set(calls) <= set(candidates)  # nothing but the estimate is consulted, nothing is run
    if budget >= np.prod(stored):
        assert chosen == stored and calls == [stored]


def test_memory_budget_is_the_given_gib_or_a_share_of_what_is_available(monkeypatch):
    assert memory_budget(2) == (2 << 30, "--memory-gib 2")
    monkeypatch.setattr(
        predict_module.psutil, "virtual_memory", lambda: type("M", (), {"available": 10 << 30})
    )
    assert memory_budget() == (9 << 30, "90% of the 10.00 GiB available")
    assert memory_budget(None, 1 / 2) == (
        int(4.5 * 2**30),
        "90% of the 10.00 GiB available, shared by 2 workers",
    )
    with pytest.raises(InputError, match="memory budget must be a positive number of GiB"):
        PredictSettings(memory_gib=0)


def test_the_estimate_grows_with_the_window_and_counts_activations_on_the_cpu_only():
    common = dict(resident=0, shape=(500, 300, 300), itemsize=1, n_classes=3, stage1_channels=0, width=16,
                  batch=1, precision="fp32", probabilities=False)  # fmt: skip
    sizes = [peak_bytes((n, n, n), device="cpu", **common) for n in (48, 96, 160, 240)]
    assert sizes == sorted(sizes)
    activations = peak_bytes((160,) * 3, device="cpu", **common) - peak_bytes(
        (160,) * 3, device="cuda", **common
    )
    fit = predict_module.ACTIVATIONS["fp32"]
    assert activations == pytest.approx(160**3 * (fit["maps"] * 16 * 4 + fit["voxel"]), abs=2)
    bf16 = peak_bytes((160,) * 3, device="cpu", **{**common, "precision": "bf16"})
    assert bf16 < sizes[2]


# -- Predictor and the command ----------------------------------------------------------------------------
def test_predictor_chooses_a_smaller_window_for_a_small_budget(model):
    budget = _between(model)
    roomy = Predictor(model).window_for(SHAPE)
    assert roomy.window == (48, 48, 48) and roomy.how == "the model's" and roomy.refusal() is None
    tight = Predictor(model, PredictSettings(memory_gib=budget)).window_for(SHAPE)
    assert tight.window == (32, 32, 32) and tight.how == "the largest that fits" and tight.refusal() is None
    given = Predictor(model, PredictSettings(window=(48, 48, 48), memory_gib=budget)).window_for(SHAPE)
    assert given.window == (48, 48, 48) and given.fits == (32, 32, 32) and given.how == "given"
    assert "the largest window that fits is (32, 32, 32)" in given.refusal()


def test_cli_memory_gib_chooses_a_smaller_window_and_still_predicts(cli, model, image, tmp_path):
    budget = _between(model)
    stats = tmp_path / "stats.json"
    result = cli("predict", model, image, tmp_path / "a.zarr", "--memory-gib", budget, "--stats-json", stats)
    assert result.exit_code == 0, result.stderr
    assert "window (32, 32, 32) (the largest that fits): estimated peak memory" in result.stderr
    assert f"budget {budget:.2f} GiB (--memory-gib {budget:g})" in result.stderr
    assert "window (32, 32, 32)" in result.stdout
    assert json.loads(stats.read_text())["window"] == [32, 32, 32]
    chosen = open_volume(tmp_path / "a.zarr").array[...]
    explicit = predict(model, image, tmp_path / "b.zarr", window=(32, 32, 32), progress=False)
    assert explicit["window"] == [32, 32, 32]
    np.testing.assert_array_equal(chosen, open_volume(tmp_path / "b.zarr").array[...])
    assert len(np.unique(chosen)) > 1
    default = cli("predict", model, image, tmp_path / "c.zarr")  # the machine's memory: the model's window
    assert default.exit_code == 0 and "window (48, 48, 48) (the model's)" in default.stderr
    assert "% of the" in default.stderr and "GiB available)" in default.stderr


def test_cli_refuses_a_given_window_above_the_budget_in_one_line(cli, model, image, tmp_path):
    budget = _between(model)
    out = tmp_path / "out"
    out.mkdir()
    args = ("predict", model, image, out / "a.zarr", "--memory-gib", budget, "--window", 48, 48, 48)
    result = cli(*args, "--no-progress")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {image}: window (48, 48, 48) needs about ")
    assert (
        f"more than the budget of {budget:.2f} GiB (--memory-gib {budget:g}); the largest window that fits "
        "is (32, 32, 32): a smaller --window, or --force to try anyway"
    ) in result.stderr
    assert list(out.iterdir()) == []  # nothing written
    forced = cli(*args, "--force", "--no-progress")
    assert forced.exit_code == 0 and "window (48, 48, 48)" in forced.stdout


def test_cli_refuses_a_budget_no_window_fits_unless_forced(cli, model, tmp_path):
    image = _image(tmp_path / "image.npy")  # 40 x 20 x 24
    result = cli("predict", model, image, tmp_path / "a.npy", "--memory-gib", 0.01, "--no-progress")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "even the smallest window (16, 16, 16) needs about" in result.stderr
    assert "a larger --memory-gib, or --force to try anyway" in result.stderr
    assert not (tmp_path / "a.npy").exists()
    forced = cli("predict", model, image, tmp_path / "a.npy", "--memory-gib", 0.01, "--force")
    assert forced.exit_code == 0 and "window (16, 16, 16) (the smallest)" in forced.stderr


def test_a_resumed_run_keeps_the_interrupted_runs_window(model, tmp_path):
    """The window of an interrupted run is used again on resume, whatever the budget now chooses."""
    shape = (128, 48, 48)
    image = _image(tmp_path / "image.npy", shape=shape)
    output = tmp_path / "out.zarr"
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "KILL_AFTER": "1", "OMP_NUM_THREADS": "1"}  # the first of two 64-slice chunks lands
    done = subprocess.run([sys.executable, script, model, image, output], env=env, check=False)
    assert done.returncode == -9 and not output.exists()
    budget = _between(model, shape)
    assert Predictor(model, PredictSettings(memory_gib=budget)).window_for(shape).window == (32, 32, 32)
    with pytest.raises(
        InputError, match=r"the interrupted run's window \(48, 48, 48\) needs about .* resume anyway"
    ):
        predict(model, image, output, progress=False, resume=True, memory_gib=budget)
    stats = predict(model, image, output, progress=False, resume=True, memory_gib=budget, force=True)
    assert stats["window"] == [48, 48, 48] and stats["windows"] == 4  # z starts 20, 40, 60, 80 reach past 64
    with pytest.raises(InputError, match="nothing to resume"):  # not a fresh run in disguise
        predict(model, image, tmp_path / "again.zarr", progress=False, resume=True)
    predict(model, image, tmp_path / "whole.zarr", progress=False)
    np.testing.assert_array_equal(
        open_volume(output).array[...], open_volume(tmp_path / "whole.zarr").array[...]
    )


# -- the Dask path ---------------------------------------------------------------------------------------
def test_dask_blocks_get_the_window_the_budget_allows(model, image, tmp_path):
    from meunet.distributed import _window, block_peak_bytes

    volume = open_volume(image)
    target = tmp_path / "a.zarr"
    remote = Predictor(model)
    assert _window(remote, volume, target, None, None, "tcp://scheduler:8786", False, False) == (48, 48, 48)
    small = block_peak_bytes(remote, SHAPE, np.uint8, (64, 128, 128), None, (32, 32, 32))
    large = block_peak_bytes(remote, SHAPE, np.uint8, (64, 128, 128), None, (48, 48, 48))
    assert small < large
    tight = Predictor(model, PredictSettings(memory_gib=(small + large) / 2 / 2**30))
    assert _window(tight, volume, target, None, None, "tcp://scheduler:8786", False, False) == (32, 32, 32)
    given = Predictor(model, PredictSettings(window=(48, 48, 48), memory_gib=(small + large) / 2 / 2**30))
    with pytest.raises(
        InputError, match=r"one block of \(48, 48, 48\) windows: window .* the largest window"
    ):
        _window(given, volume, target, None, None, "tcp://scheduler:8786", False, False)
    assert _window(Predictor(model), volume, target, None, None, "local:2", False, False) == (48, 48, 48)
