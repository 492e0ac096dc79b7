"""The planner: decisions as a pure function of the data fingerprint and a device description (no GPU
needed: memory is counted on the meta device), `meunet plan`'s bad input, and a time-budgeted training run."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from meunet.errors import InputError
from meunet.io import Volume, write_volume
from meunet.models import PAPER_WIDTHS
from meunet.train import load_config, parse_config, train
from meunet.train.config import VolumePair, parse_duration
from meunet.train.loop import PhaseClock
from meunet.train.plan import (
    CPU_WIDTHS,
    MEMORY_FRACTION,
    DeviceInfo,
    Fingerprint,
    Spec,
    Timing,
    fingerprint,
    peak_bytes,
    plan_run,
    threshold_dice,
)

GIB = 2**30
PAPER_DATA = Fingerprint([(512, 512, 512)] * 3, [(512, 512, 512)], (0.01,) * 3, {}, [0.9, 0.07, 0.03])
FLY_DATA = Fingerprint([(192, 96, 96)] * 5, [(192, 96, 96)], (0.01,) * 3, {}, [0.9, 0.08, 0.02])


def _gpu(gib: float, bf16: bool = True) -> DeviceInfo:
    return DeviceInfo("cuda", "cuda:0", int(gib * GIB), 16, bf16, present=False)


def _spec(plan, side: int) -> Spec:
    v = plan.value
    return Spec(tuple(v("model.widths")), "instance", v("model.checkpointing"), side, 1.5,
                v("training.batch_size"), v("precision"), 3)  # fmt: skip


def test_80_gb_gpu_gets_the_papers_recipe():
    plan = plan_run(PAPER_DATA, _gpu(80), {})
    assert plan.value("patch.size") == 160 and plan.window == 240
    assert plan.value("training.batch_size") == 4
    assert plan.value("model.widths") == list(PAPER_WIDTHS)
    assert plan.value("model.checkpointing") is True and plan.value("precision") == "bf16"
    assert plan.value("model.stage1") == "meunet"
    assert plan.stages["stage 1"]["peak_bytes"] <= MEMORY_FRACTION * 80 * GIB
    assert all(why for _, why in plan.keys.values())


def test_12_gb_gpu_gets_the_largest_smaller_pair_that_fits_on_the_meta_device():
    plan = plan_run(PAPER_DATA, _gpu(12), {})
    side = plan.value("patch.size")
    assert side < 160 and plan.value("training.batch_size") == 4
    budget = MEMORY_FRACTION * 12 * GIB
    assert max(peak_bytes(s, _spec(plan, side)) for s in (1, 2)) <= budget
    assert max(peak_bytes(s, _spec(plan, side + 16)) for s in (1, 2)) > budget


@pytest.mark.parametrize("gib", [12, 24, 80])
def test_every_gpu_plan_of_paper_size_volumes_fits_its_memory_on_the_meta_device(gib):
    plan = plan_run(PAPER_DATA, _gpu(gib), {})
    peaks = [peak_bytes(s, _spec(plan, plan.value("patch.size"))) for s in (1, 2)]
    assert 0 < max(peaks) <= MEMORY_FRACTION * gib * GIB
    assert plan.window >= plan.value("patch.size")


def test_two_core_cpu_gets_a_narrow_network_and_small_patches():
    cpu = DeviceInfo("cpu", "cpu", 8 * GIB, 2, False, present=False)
    plan = plan_run(FLY_DATA, cpu, {}, budget=parse_duration("30m"))
    assert plan.value("model.widths") == list(CPU_WIDTHS)
    assert plan.value("patch.size") == 32 and plan.value("training.batch_size") == 4
    assert plan.value("model.checkpointing") is False and plan.value("training.workers") == 0
    # time, not memory, bounds a CPU: the faster plain U-net alone (measured in docs/results.md)
    assert plan.value("model.stage1") == "unet" and plan.value("stages") == "1"
    assert "no cascade has beaten" in plan.keys["stages"][1]
    assert plan.value("precision") == "fp32"
    assert plan.seconds <= parse_duration("30m")
    assert plan.value("training.max_iterations") >= 20


def test_keys_the_user_sets_are_never_changed():
    fixed = {"patch.size": 48, "model.widths": [4, 8, 8, 8, 8], "training.batch_size": 2, "stages": "both"}
    plan = plan_run(FLY_DATA, DeviceInfo("cpu", "cpu", 8 * GIB, 2, False, present=False), fixed, budget=3600)
    assert not set(fixed) & set(plan.planned)
    assert all(plan.keys[key] == (value, "set") for key, value in fixed.items() if key != "stages")
    assert "fold 1" in plan.stages and "stage 2" in plan.stages


def test_a_plain_unet_stage_1_is_planned_as_the_network_it_trains():
    """``model.stage1: unet`` trains a U-net on the local patch: no context, fewer activations, so a time
    budget fills with more of its steps than of the meU-net's (the benchmarks' baselines rely on it)."""
    from meunet.memory import count_saved_bytes
    from meunet.models import UNet3D
    from meunet.train.loss import wd_loss
    from meunet.train.plan import _counted

    meunet = Spec((4, 8, 8, 8, 8), "instance", False, 32, 1.5, 2, "fp32", 3)
    unet = replace(meunet, stage1="unet")
    assert peak_bytes(1, unet) < peak_bytes(1, meunet)
    with torch.device("meta"):
        net = UNet3D(1, 3, widths=unet.widths, norm="instance", checkpointing=False)
        image, labels = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 32, 32, 32))
        weights = torch.full((3,), 1 / 3)
    counted = count_saved_bytes(lambda: wd_loss(net(image), labels, weights), [*net.parameters()])[1]
    assert _counted(1, unet)[0] == counted
    cpu = DeviceInfo("cpu", "cpu", 8 * GIB, 2, False, present=False)
    steps = {
        arch: plan_run(FLY_DATA, cpu, {"model.stage1": arch, "stages": "1"}, budget=600).value(
            "training.max_iterations"
        )
        for arch in ("meunet", "unet")
    }
    assert steps["unet"] > steps["meunet"]


def test_too_little_memory_or_time_says_what_the_smallest_plan_needs():
    with pytest.raises(InputError, match=r"too small for any network: the smallest plan .* needs \d"):
        plan_run(PAPER_DATA, _gpu(0.01), {})
    cpu = DeviceInfo("cpu", "cpu", 8 * GIB, 2, False, present=False)
    with pytest.raises(InputError, match=r"too short .* needs about"):
        plan_run(FLY_DATA, cpu, {}, budget=10)


CPU = DeviceInfo("cpu", "cpu", 8 * GIB, 2, False, present=False)


def test_a_budget_counts_the_users_validations_and_names_a_max_iterations_below_its_minimum():
    fixed = {"stages": "1", "training.validate_every": 2}
    plan = plan_run(FLY_DATA, CPU, fixed, budget=600)
    assert plan.seconds <= 600 and plan.value("training.validate_every") == 2
    assert plan.stages["stage 1"]["iterations"] < plan_run(FLY_DATA, CPU, {"stages": "1"}, 600).value(
        "training.max_iterations"
    )
    with pytest.raises(InputError, match=r"^training.max_iterations: 2 is below the 20 steps per stage"):
        plan_run(FLY_DATA, CPU, {**fixed, "training.max_iterations": 2}, budget=600)


@pytest.mark.parametrize(
    ("shares", "threshold", "fixed", "norm"),
    [
        ({32: 0.78, 48: 0.52, 64: 0.44}, 0.0, {}, "batch"),  # the re-acquired fly: 97 % air
        ({32: 0.3, 48: 0.06, 64: 0.0}, 0.15, {}, "instance"),  # a synthetic fly (its body fills the windows)
        ({48: 0.0}, 0.99, {}, "batch"),  # bone: a threshold separates its phases
        ({}, 0.0, {}, "instance"),  # nothing measured
        ({48: 0.52}, 0.9, {"model.norm": "instance"}, "instance"),  # the user's choice
        ({48: 0.52}, 0.9, {"training.batch_size": 1}, "instance"),  # batch statistics of one sample
    ],
)
def test_the_norm_follows_flat_windows_and_how_well_a_threshold_separates_the_classes(
    shares, threshold, fixed, norm
):
    plan = plan_run(replace(FLY_DATA, flat_shares=shares, threshold_dice=threshold), CPU, fixed)
    assert plan.window == 48 and plan.value("model.norm") == norm
    assert ("model.norm" in plan.planned) == ("model.norm" not in fixed)


def test_the_fingerprint_measures_whether_a_threshold_separates_the_classes(tmp_path):
    """A bright ball in noise is separable; two balls of the same brightness, one labelled, are not."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:64, :64, :64]
    ball = ((z - 32) ** 2 + (y - 20) ** 2 + (x - 32) ** 2 < 12**2).astype(np.uint8)
    twin = ((z - 32) ** 2 + (y - 46) ** 2 + (x - 32) ** 2 < 12**2).astype(np.uint8)
    separable = (50 + 100 * ball + rng.normal(0, 15, ball.shape)).astype(np.float32)
    alike = (50 + 100 * (ball | twin) + rng.normal(0, 15, ball.shape)).astype(np.float32)
    dice = []
    for name, image in (("separable", separable), ("alike", alike)):
        write_volume(tmp_path / f"{name}.npy", Volume(image))
        write_volume(tmp_path / f"{name}_lab.npy", Volume(ball))
        pair = VolumePair(image=tmp_path / f"{name}.npy", label=tmp_path / f"{name}_lab.npy")
        dice.append(fingerprint([pair], [], ["background", "ball"]).threshold_dice)
    assert dice[0] > 0.95 and dice[1] < 0.7  # the twin doubles the thresholded voxels: Dice 2/3
    assert threshold_dice(np.full(ball.shape, 7.0), ball, 2) == 0.0  # one grey value: nothing to threshold


def test_the_fingerprint_measures_flat_windows_of_the_training_images(tmp_path):
    """Mostly air with one textured object: the 48^3 windows of air are flat; noise everywhere is not."""
    rng = np.random.default_rng(0)
    air = rng.normal(20, 2, (96, 96, 96)).astype(np.float32)
    air[:48, :48, :48] = rng.normal(120, 40, (48, 48, 48))
    labels = (air > 60).astype(np.uint8)
    textured = rng.normal(70, 40, air.shape).astype(np.float32)
    pairs = []
    for name, image in (("air", air), ("textured", textured)):
        write_volume(tmp_path / f"{name}.npy", Volume(image))
        write_volume(tmp_path / f"{name}_lab.npy", Volume(labels))
        pairs.append(VolumePair(image=tmp_path / f"{name}.npy", label=tmp_path / f"{name}_lab.npy"))
    shares = [fingerprint([p], [], ["background", "object"]).flat_shares for p in pairs]
    assert shares[0][48] == 7 / 8 and shares[1][48] == 0.0
    plan = plan_run(fingerprint(pairs[:1], [], ["background", "object"]), CPU, {})
    assert plan.value("model.norm") == "batch"


def test_durations():
    assert [parse_duration(t) for t in ("10m", "1h30m", "90s", "1.5h", 45)] == [600, 5400, 90, 5400, 45]
    for bad in ("ten minutes", "", "0m", "-5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(32)] * 3, indexing="ij")
    c = rng.uniform(10, 22, 3)
    labels = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 49).astype(np.uint8)
    image = (60 + 80 * labels + rng.normal(0, 15, labels.shape)).clip(0, 255).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """A configuration with the keys a tiny CPU run needs set, the rest left to the planner."""
    folder = tmp_path_factory.mktemp("plan")
    for i in range(2):
        image, labels = _phantom(i)
        write_volume(folder / f"img{i}.npy", Volume(image))
        write_volume(folder / f"lab{i}.npy", Volume(labels))
    pair = [{"image": f"img{i}.npy", "label": f"lab{i}.npy"} for i in range(2)]
    config = {
        "output": "model",
        "stages": 1,
        "data": {"train": pair[:1], "validation": pair[1:]},
        "model": {"classes": ["background", "ball"], "widths": [2, 4, 4, 4, 4], "norm": "batch"},
        "patch": {"size": 16},
        "training": {"progress": False},
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    return folder / "tiny.yaml"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--time-budget", "soon"), "--time-budget: not a duration like 10m"),
        (("--device", "cpu", "--memory-gib", "0.000001"), "too small for any network: the smallest plan"),
        (("--device", "tpu"), "--device: must be auto, cpu, cuda"),
        (("--device", "meta"), "--device: must be auto, cpu, cuda, cuda:N or mps, not 'meta'"),
        (("--device", "cpu:1"), "--device: must be auto, cpu, cuda, cuda:N or mps, not 'cpu:1'"),
        (("--device", "cuda:x"), "--device: must be auto, cpu, cuda, cuda:N or mps, not 'cuda:x'"),
        (("--memory-gib", "1e400"), "--memory-gib: must be a number of GiB above 0, up to 1048576, not inf"),
        (("--memory-gib", "nan"), "--memory-gib: must be a number of GiB above 0, up to 1048576, not nan"),
        (("--time-budget", "9000h"), "--time-budget: a duration must be positive and at most a year"),
    ],
)
def test_plan_bad_input_is_one_line_exit_2_nothing_written(cli, config_file, args, message):
    out = config_file.parent / "planned.yaml"
    result = cli("plan", config_file, *args, "--out", out)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize(
    ("labels", "message"),
    [(np.full((32, 32, 32), -1, np.int8), "label value -1 outside the 2 classes"),
     (np.full((32, 32, 32), 0.5, np.float32), "label values must be integers")],
)  # fmt: skip
def test_labels_that_are_not_class_indices_are_one_line_before_the_plan(
    cli, config_file, tmp_path, labels, message
):
    """The planner reads the labels first (class fractions): a bad value is the data checks' one line."""
    write_volume(tmp_path / "bad.npy", Volume(labels))
    config = yaml.safe_load(config_file.read_text())
    config["output"] = str(tmp_path / "model")
    image = config_file.parent / config["data"]["train"][0]["image"]
    config["data"]["train"] = [{"image": str(image), "label": str(tmp_path / "bad.npy")}]
    config["data"]["validation"] = [
        {k: str(config_file.parent / v) for k, v in config["data"]["validation"][0].items()}
    ]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    for command in ("plan", "train"):
        result = cli(command, tmp_path / "bad.yaml", "--time-budget", "1m")
        assert result.exit_code == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()


def test_plan_for_an_absent_gpu_needs_its_memory(cli, config_file):
    result = cli("plan", config_file, "--device", "cuda")
    assert result.exit_code == 2 and "not available on this machine" in result.stderr


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is here")
def test_plan_for_an_absent_mps_is_one_short_line_and_cpu_0_is_the_cpu(cli, config_file):
    result = cli("plan", config_file, "--device", "mps")
    assert result.exit_code == 2
    assert result.stderr == "error: --device: mps is not available on this machine\n"
    result = cli("plan", config_file, "--device", "cpu:0")
    assert result.exit_code == 0 and result.stdout.startswith("plan for cpu,"), result.stderr


def test_plan_refuses_its_configuration_as_out_even_with_force(cli, config_file):
    before = config_file.read_text()
    result = cli("plan", config_file, "--out", config_file, "--force")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {config_file}: is, holds or lies in an input")
    assert config_file.read_text() == before


def test_plan_writes_a_complete_configuration_with_reasons(cli, config_file):
    out = config_file.parent / "planned.yaml"
    result = cli("plan", config_file, "--device", "cpu", "--time-budget", "1h", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "training.max_iterations" in result.stdout and "expected whole run" in result.stdout
    text = out.read_text()
    assert "  max_iterations: " in text and "  # fills 1 h 0 min at" in text
    assert "  widths: [2, 4, 4, 4, 4]\n" in text  # the user's key: no comment
    planned = load_config(out)
    assert planned.training.time_budget == 3600 and planned.model.widths == [2, 4, 4, 4, 4]
    out.unlink()


def test_a_time_budget_stops_training_and_keeps_a_validated_model(config_file, tmp_path, monkeypatch):
    import meunet.train.pipeline as pipeline

    # a fixed calibration: the plan (far more steps than 8 s allow) is the same on every machine
    monkeypatch.setattr(pipeline, "calibrate", lambda spec, device: Timing((0.002, 0.002), (0.001, 0.001)))
    values = yaml.safe_load(config_file.read_text())
    values["output"] = str(tmp_path / "model")
    values["training"]["time_budget"] = "8s"
    config = parse_config(values, "tiny.yaml", config_file.parent)
    train(config, started=time.monotonic())
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    planned = meta["plan"]["keys"]
    assert planned["model.widths"] == {"value": [2, 4, 4, 4, 4], "why": "set", "planned": False}
    assert planned["training.max_iterations"]["planned"]
    assert meta["train_config"]["training"]["max_iterations"] == planned["training.max_iterations"]["value"]
    assert (tmp_path / "model" / "stage1.pt").exists()
    rows = (tmp_path / "model" / "train_log.csv").read_text().splitlines()[1:]
    assert rows and int(rows[-1].split(",")[1]) <= planned["training.max_iterations"]["value"]


def test_a_budgeted_stage_plans_its_steps_again_from_the_measured_speed(config_file, tmp_path, monkeypatch):
    import meunet.train.pipeline as pipeline

    # a calibration far slower than the tiny network: the plan's few steps would end the run early
    monkeypatch.setattr(pipeline, "calibrate", lambda spec, device: Timing((0.2, 0.2), (0.01, 0.01)))
    values = yaml.safe_load(config_file.read_text())
    values["output"] = str(tmp_path / "model")
    values["training"]["time_budget"] = "20s"
    train(parse_config(values, "tiny.yaml", config_file.parent), started=time.monotonic())
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    planned = meta["plan"]["keys"]["training.max_iterations"]["value"]
    rows = (tmp_path / "model" / "train_log.csv").read_text().splitlines()[1:]
    assert int(rows[-1].split(",")[1]) > 2 * planned


def test_a_stage_past_its_deadline_validates_and_stops(config_file, tmp_path, monkeypatch):
    import meunet.train.pipeline as pipeline

    run = pipeline.StageTrainer.run
    monkeypatch.setattr(
        pipeline.StageTrainer, "run", lambda self, resume, *a: run(self, resume, PhaseClock(time.monotonic()))
    )
    values = yaml.safe_load(config_file.read_text())
    values["output"] = str(tmp_path / "model")
    values["training"].update(max_iterations=50, validate_every=25)
    train(parse_config(values, "tiny.yaml", config_file.parent))
    rows = (tmp_path / "model" / "train_log.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["1"]
