"""Training end to end on tiny volumes: determinism, resumption, bad configurations and data, both stages."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from meunet.errors import InputError
from meunet.io import Volume, read_volume, write_volume
from meunet.models import load_model_dir
from meunet.train import parse_config, train


def _phantom(seed: int, shape=(32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A bright ball (class 1) with a brighter core (class 2) in noise: uint8 image and labels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = rng.uniform(10, 22, 3)
    r2 = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
    labels = ((r2 < 49).astype(np.uint8) + (r2 < 9)).astype(np.uint8)
    image = (60 + 50 * labels + rng.normal(0, 15, shape)).clip(0, 255).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        image, labels = _phantom(i)
        write_volume(folder / f"img{i}.npy", Volume(image))
        write_volume(folder / f"lab{i}.npy", Volume(labels))
    return folder


def _config(volumes: Path, output: Path, **overrides) -> dict:
    config = {
        "output": str(output),
        "stages": 1,
        "model": {
            "classes": ["background", "ball", "core"],
            "stage1": "meunet",  # the method (a CPU plan would choose a plain U-net)
            "widths": [2, 4, 4, 4, 4],
            "norm": "batch",  # instance norm needs patches of 32 and more
            "checkpointing": False,
        },
        "data": {
            "train": [
                {"image": str(volumes / f"img{i}.npy"), "label": str(volumes / f"lab{i}.npy")} for i in (0, 1)
            ],
            "validation": [{"image": str(volumes / "img2.npy"), "label": str(volumes / "lab2.npy")}],
        },
        "patch": {"size": 16},
        "training": {"batch_size": 2, "max_iterations": 6, "validate_every": 3, "progress": False},
        "augmentation": {"affine_probability": 0.5},
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            config[section] = {**config.get(section, {}), name: value}
        else:
            config[section] = value
    return config


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return torch.load(output / "checkpoint_stage1.pt", weights_only=True)["net"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_same_seed_same_weights_whatever_the_loader_workers(volumes, tmp_path):
    train(parse_config(_config(volumes, tmp_path / "a"), "cfg"))
    train(parse_config(_config(volumes, tmp_path / "b", **{"training.workers": 1}), "cfg"))
    train(parse_config(_config(volumes, tmp_path / "c", seed=1), "cfg"))
    assert _max_difference(_weights(tmp_path / "a"), _weights(tmp_path / "b")) == 0
    assert _max_difference(_weights(tmp_path / "a"), _weights(tmp_path / "c")) > 1e-3


def test_resume_continues_exactly(volumes, tmp_path, cli):
    # a longer run continued: only a constant learning rate makes it the same run as one of 8 steps
    constant = {"training.schedule": "constant"}
    train(
        parse_config(_config(volumes, tmp_path / "whole", **constant, **{"training.max_iterations": 8}), "c")
    )
    half = _config(volumes, tmp_path / "split", **constant, **{"training.max_iterations": 4})
    train(parse_config(half, "cfg"))
    assert (
        torch.load(tmp_path / "split" / "checkpoint_stage1.pt", weights_only=True)["progress"]["iteration"]
        == 4
    )
    half["training"]["max_iterations"] = 8
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(half))
    result = cli("train", tmp_path / "resume.yaml", "--resume")
    assert result.exit_code == 0, result.stderr
    assert _max_difference(_weights(tmp_path / "whole"), _weights(tmp_path / "split")) < 1e-6
    logged = [
        line.split(",")[1] for line in (tmp_path / "split" / "train_log.csv").read_text().splitlines()[1:]
    ]
    assert logged == ["3", "4", "6", "8"]


class _Payload:
    """A pickle that would run code when loaded without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _saved(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def test_resume_from_a_broken_or_foreign_checkpoint_is_one_line(volumes, tmp_path, cli):
    config = _config(volumes, tmp_path / "run", **{"training.max_iterations": 2})
    train(parse_config(config, "cfg"))
    checkpoint = tmp_path / "run" / "checkpoint_stage1.pt"
    good = checkpoint.read_bytes()
    config["training"]["max_iterations"] = 4
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(config))
    wider = {**config, "model": {**config["model"], "widths": [4, 8, 8, 8, 8]}}
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(wider))
    cases = {
        "unreadable as torch weights": (good[: len(good) // 2], "more.yaml"),
        "refused (unpickling them could run code)": (pickle.dumps(_Payload(tmp_path / "ran")), "more.yaml"),
        "not a meunet checkpoint": (_saved({"weights": torch.zeros(1)}), "more.yaml"),
        "error: model.widths: [4, 8, 8, 8, 8] differs from the run being resumed in": (good, "wider.yaml"),
    }
    for message, (content, name) in cases.items():
        checkpoint.write_bytes(content)
        result = cli("train", tmp_path / name, "--resume")
        *before, last = result.stderr.splitlines()
        assert result.exit_code == 2 and last.startswith("error: ") and message in last, message
        assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
        assert not before or "plan for" in before[0]  # the plan table, printed before the first step
        assert not before or name == "more.yaml"  # a changed network: one line, before any plan
    assert not (tmp_path / "ran").exists()


def test_killed_run_resumes_exactly_with_a_decaying_learning_rate(volumes, tmp_path, cli, monkeypatch):
    import meunet.train.loop as loop

    settings = {"training.max_iterations": 8, "training.validate_every": 4, "training.warmup": 0.25}
    train(parse_config(_config(volumes, tmp_path / "whole", **settings), "cfg"))
    save = loop.save_checkpoint

    def save_then_die(path, payload):
        save(path, payload)
        raise KeyboardInterrupt  # killed right after the checkpoint of step 4

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    config = _config(volumes, tmp_path / "split", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(config, "cfg"))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    train(parse_config(config, "cfg"), resume=True)
    assert _max_difference(_weights(tmp_path / "whole"), _weights(tmp_path / "split")) < 1e-6


def test_resumed_stage_2_keeps_the_log_rows_of_both_stages(volumes, tmp_path, monkeypatch):
    import meunet.train.loop as loop

    save = loop.save_checkpoint

    def die_at_stage_2_step_6(path, payload):
        save(path, payload)
        if payload["stage"] == 2 and payload["progress"]["iteration"] == 6:
            raise KeyboardInterrupt

    settings = {"stages": "both", "training.max_iterations": 9, "training.validate_every": 3}
    settings["stage2.out_of_fold"] = False
    config = _config(volumes, tmp_path / "m", **settings)
    monkeypatch.setattr(loop, "save_checkpoint", die_at_stage_2_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(config, "cfg"))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    train(parse_config(config, "cfg"), resume=True)
    rows = (tmp_path / "m" / "train_log.csv").read_text().splitlines()[1:]
    expected = [(stage, step) for stage in ("1", "2") for step in ("3", "6", "9")]
    assert [tuple(r.split(",")[:2]) for r in rows] == expected


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text + "1,abc,2,x\n", "line 4 is not a row of a meunet training log"),
        (lambda text: text[: len(text.splitlines()[0]) + 10], "line 2 is not a row of a meunet training log"),
        (lambda text: "", "its columns are not those of this run"),
        (lambda text: "\udcff", "not a meunet training log ('utf-8' codec can't decode"),
    ],
)
def test_resume_with_a_damaged_train_log_is_one_line_naming_it(volumes, tmp_path, cli, damage, message):
    config = _config(volumes, tmp_path / "run", **{"training.max_iterations": 6})
    train(parse_config(config, "cfg"))
    log = tmp_path / "run" / "train_log.csv"
    log.write_bytes(damage(log.read_text()).encode("utf-8", "surrogateescape"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    config["training"]["max_iterations"] = 9
    result, _ = _run(cli, tmp_path, config, "--resume")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {log}: {message}"), result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


@pytest.mark.parametrize("fail_at", [3, 6])
def test_a_run_failing_before_its_first_checkpoint_leaves_nothing_later_keeps_it(
    volumes, tmp_path, monkeypatch, fail_at
):
    import errno

    import meunet.train.loop as loop

    save = loop.save_checkpoint

    def disk_full_at(path, payload):
        if payload["progress"]["iteration"] == fail_at:
            raise InputError(path, f"cannot write: {os.strerror(errno.ENOSPC)}")
        save(path, payload)

    monkeypatch.setattr(loop, "save_checkpoint", disk_full_at)
    with pytest.raises(InputError, match="No space left on device"):
        train(parse_config(_config(volumes, tmp_path / "run"), "cfg"))
    if fail_at == 3:  # the first checkpoint: nothing to resume, so nothing is left
        assert list(tmp_path.iterdir()) == []
    else:  # the checkpoint of step 3 is kept, and --resume continues from it
        assert (tmp_path / "run" / "checkpoint_stage1.pt").is_file()
        monkeypatch.setattr(loop, "save_checkpoint", save)
        train(parse_config(_config(volumes, tmp_path / "run"), "cfg"), resume=True)


def test_model_directory(volumes, tmp_path):
    out = train(parse_config(_config(volumes, tmp_path / "m"), "cfg"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["background", "ball", "core"]
    assert meta["patch"] == [16, 16, 16] and meta["window"] == [24, 24, 24] and meta["stage2"] is None
    assert set(meta["normalization"]) == {"clip_low", "clip_high", "mean", "std"}
    assert meta["train_config"]["training"]["max_iterations"] == 6 and meta["versions"]["torch"]
    bundle = load_model_dir(out)
    assert bundle.stage1.spec["widths"] == [2, 4, 4, 4, 4]
    header = (out / "train_log.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["dice_background", "dice_ball", "dice_core", "mean_foreground_dice"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_both_stages_with_cached_stage1_probabilities(volumes, tmp_path):
    config = _config(
        volumes,
        tmp_path / "both",
        stages="both",
        **{"model.fusion": "pre", "stage2.out_of_fold": False, "stage2.keep_if_better": False},
    )
    out = train(parse_config(config, "cfg"))
    cache = zarr.open_array(str(out / "stage1_cache" / "train_0.zarr"), mode="r")
    assert cache.shape == (3, 32, 32, 32) and cache.dtype == np.float16
    assert np.allclose(np.asarray(cache[:, :4]).astype(np.float32).sum(0), 1, atol=3e-3)
    bundle = load_model_dir(out)
    assert bundle.cascade is not None and bundle.meta["stage2"]["fusion"] == "pre"
    assert {line.split(",")[0] for line in (out / "train_log.csv").read_text().splitlines()[1:]} == {"1", "2"}
    written = (out / "stage1_cache" / "train_0.json").stat().st_mtime_ns
    train(parse_config({**config, "stages": 2}, "cfg"), force=True)  # stage 2 again: the cache is reused
    assert (out / "stage1_cache" / "train_0.json").stat().st_mtime_ns == written
    assert (out / "stage1.pt").exists() and (out / "stage2.pt").exists()


def _run(cli, tmp_path, config: dict, *args):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli("train", path, *args), path


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"model.widths": [2, 4, 4]},
            "model.widths: List should have at least 5 items after validation, not 3",
        ),
        ({"patch.size": [16, 16, 15]}, "patch.size: each side must be even, from 8 to 1024"),
        ({"stages": 3}, "stages: Input should be '1', '2' or 'both'"),
        ({"training.learning_rate": -1}, "training.learning_rate: Input should be greater than 0"),
        ({"training.batchsize": 2}, "training.batchsize: Extra inputs are not permitted"),
        ({"precision": "fp8"}, "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"device": "gpu"}, "device: must be auto, cpu, cuda, cuda:N or mps"),
        (
            {"model.norm": "instance"},
            "patch.size: instance norm needs sides of at least 32 (the bottleneck is 1/16 of the patch); "
            "use a larger patch or model.norm: batch",
        ),
        ({"data": {"train": []}}, "data: give a dataset, or at least one train and one validation pair"),
        ({"seed": 2**64}, "seed: Input should be less than or equal to 4294967295"),
        ({"training.learning_rate": 1e9}, "training.learning_rate: Input should be less than or equal to 1"),
        ({"device": "cpu:1"}, "device: must be auto, cpu, cuda, cuda:N or mps, not 'cpu:1'"),
        ({"patch.size": 2048}, "patch.size: each side must be even, from 8 to 1024"),
        ({"patch.context_scale": 1e300}, "patch.context_scale: Input should be less than or equal to 4"),
        ({"model.classes": ["bg", "gut", "gut"]}, "model.classes: class name 'gut' given twice"),
        ({"model.classes": ["bg", "", "c"]}, "model.classes: class name '': need non-empty one-line text"),
        ({"model.classes": ["bg", "a\nb", "c"]}, "model.classes: class name 'a\\nb': need non-empty"),
        (
            {"training.batch_size": 1},
            "training.batch_size: batch norm of one patch of one voxel at the bottleneck (1/16 of patch.size "
            "(16, 16, 16)) has no variance: use batch_size >= 2 or sides >= 32",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(volumes, tmp_path, cli, change, expected):
    result, path = _run(cli, tmp_path, _config(volumes, tmp_path / "out", **change))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {path}: {expected}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"\xff\xfeo\x00u\x00", "not UTF-8 text (byte 0): a YAML configuration is"),  # UTF-16
        (b"stages: 1\nseed: 1\nstages: 2\n", "not valid YAML: key 'stages' given twice (line 3)"),
        (b"model:\n  norm: batch\n  norm: instance\n", "not valid YAML: key 'norm' given twice (line 3)"),
        (
            b"x: !!python/object/apply:os.system [echo hi]\n",
            "not valid YAML: could not determine a constructor",
        ),
        (b"output: m\n  data: [\n", "not valid YAML: mapping values are not allowed here (line 2, column 7)"),
        (b"output: m\ndata: " + b"[" * 5000 + b"]" * 5000, "not valid YAML: nested too deeply"),
    ],
)
def test_an_unreadable_or_ambiguous_yaml_is_one_line_naming_it(tmp_path, cli, text, expected):
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    result = cli("train", path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {path}: {expected}"), result.stderr


def _bad_volume(folder: Path, kind: str) -> dict:
    image, labels = _phantom(0)
    if kind == "shape":
        labels = labels[:, :, :30]
    elif kind == "values":
        labels[5, 5, 5] = 3
    else:
        image = image.astype(np.float32)
        image[20, 1, 2] = np.nan
    write_volume(folder / f"{kind}_img.npy", Volume(image))
    write_volume(folder / f"{kind}_lab.npy", Volume(labels))
    return {"image": str(folder / f"{kind}_img.npy"), "label": str(folder / f"{kind}_lab.npy")}


@pytest.mark.parametrize(
    ("kind", "which", "message"),
    [
        ("shape", "lab", "label shape (32, 32, 30) differs from image shape (32, 32, 32)"),
        ("values", "lab", "label value 3 outside the 3 classes (0..2)"),
        ("nan", "img", "NaN or infinite voxel in slice z = 20"),
    ],
)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_bad_data_is_one_line_and_writes_nothing(volumes, tmp_path, cli, kind, which, message, split):
    config = _config(volumes, tmp_path / "out")
    config["data"][split] = [*config["data"][split], _bad_volume(tmp_path, kind)]
    result, _ = _run(cli, tmp_path, config)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / f'{kind}_{which}.npy'}: {message}"]
    assert not (tmp_path / "out").exists()


def test_output_is_protected(volumes, tmp_path, cli):
    config = _config(volumes, tmp_path / "out", **{"training.max_iterations": 2})
    result, path = _run(cli, tmp_path, config, "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    assert cli("train", path).exit_code == 0
    result = cli("train", path)
    assert result.exit_code == 2 and "use --resume to continue it, --force to start over" in result.stderr
    assert cli("train", path, "--force").exit_code == 0
    stage2 = _config(volumes, tmp_path / "none", stages=2)
    result, _ = _run(cli, tmp_path, stage2)
    assert result.exit_code == 2 and "train stage 1 first" in result.stderr


def test_examples_are_valid_configurations():
    from meunet.train import load_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    fly = load_config(examples / "fly_synth.yaml")
    paper = load_config(examples / "paper_scale.yaml")
    assert fly.data.dataset == examples / ".." / "fly_synth" / "dataset.json"
    assert paper.patch.size == (160, 160, 160) and paper.patch.context == (240, 240, 240)
    assert (
        paper.training.batch_size == 4 and paper.training.max_epochs == 400 and paper.training.patience == 30
    )
    assert paper.model.widths == [16, 32, 64, 128, 128]


def test_stage2_trains_on_out_of_fold_stage1_output(tmp_path, monkeypatch):
    import meunet.train.pipeline as pipeline
    from meunet.data.normalization import Normalization
    from meunet.infer import SlidingWindow, image_input, predict_stage1
    from meunet.models import Cascade, MeUNet, UNet3D

    parts = [_phantom(i) for i in (0, 1)]  # one scan of 64 slices with a ball in each half
    image, labels = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
    write_volume(tmp_path / "img.npy", Volume(image))
    write_volume(tmp_path / "lab.npy", Volume(labels))
    write_volume(tmp_path / "vimg.npy", Volume(_phantom(2)[0]))
    write_volume(tmp_path / "vlab.npy", Volume(_phantom(2)[1]))
    config = _config(tmp_path, tmp_path / "m", stages="both")
    config["data"] = {
        "train": [{"image": str(tmp_path / "img.npy"), "label": str(tmp_path / "lab.npy")}],
        "validation": [{"image": str(tmp_path / "vimg.npy"), "label": str(tmp_path / "vlab.npy")}],
    }
    seen = []
    original = pipeline.without_regions

    def spy(index, regions, patch, margin):
        kept = original(index, regions, patch, margin)
        seen.append((regions, kept, margin))
        return kept

    monkeypatch.setattr(pipeline, "without_regions", spy)
    out = train(parse_config(config, "cfg"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["out_of_fold"]["regions"] == [[[0, 0, 0, 32]], [[0, 0, 32, 64]]]
    # no fold trained on a patch (with its context) that reads the slices it holds out
    assert [s[0] for s in seen] == [[(0, 0, 0, 32)], [(0, 0, 32, 64)]] and all(
        s[2] == (4, 4, 4) for s in seen
    )
    for regions, kept, _ in seen:
        (_, _, z0, z1), lo, hi = regions[0], kept.start[:, 0] - 4, kept.start[:, 0] + 16 + 4
        assert len(kept) and ((hi <= z0) | (lo >= z1)).all()
    # each region's cache is the output of the fold model that held it out, not of the final stage 1
    cache = np.asarray(zarr.open_array(str(out / "stage1_cache" / "train_0.zarr"), mode="r"))
    bundle = load_model_dir(out)
    engine = SlidingWindow((24, 24, 24), overlap=0.5, precision="auto")  # as training predicts
    norm = Normalization.from_dict(meta["normalization"])
    unet = UNet3D(1, 3, widths=[2, 4, 4, 4, 4], norm="batch")
    for fold, (z0, z1) in enumerate(((0, 32), (32, 64))):
        net = MeUNet(1, 3, widths=[2, 4, 4, 4, 4], norm="batch", checkpointing=False)
        net.load_state_dict(torch.load(out / "stage1_cache" / f"fold{fold}.pt", weights_only=True)["net"])
        for stage1, same in ((net.eval(), True), (bundle.stage1, False)):
            path = tmp_path / f"check{fold}{same}.zarr"
            predict_stage1(Cascade(stage1, unet), image_input(image, norm), path, engine)
            expected = np.asarray(zarr.open_array(str(path), mode="r"))[:, z0:z1]
            assert np.array_equal(cache[:, z0:z1], expected) == same
    log = (out / "stage1_cache" / "fold1_log.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("stage,iteration")  # the folds' cost is logged


@pytest.mark.parametrize(("stage1_score", "kept"), [(0.9, False), (-1.0, True)])
def test_the_cascade_is_kept_only_if_it_validates_better(volumes, tmp_path, monkeypatch, stage1_score, kept):
    import meunet.train.pipeline as pipeline

    load = pipeline.load_checkpoint

    def scored(path):  # stage 1's best validation Dice as the parameter says, stage 2's as trained
        state = load(path)
        if path.name == "checkpoint_stage1.pt":
            state["progress"]["best_score"] = stage1_score
        return state

    monkeypatch.setattr(pipeline, "load_checkpoint", scored)
    config = _config(volumes, tmp_path / "m", stages="both", **{"stage2.out_of_fold": False})
    out = train(parse_config(config, "cfg"))
    stage2_score = load(out / "checkpoint_stage2.pt")["progress"]["best_score"]
    assert stage2_score < 0.9  # the tiny cascade is far from perfect
    meta = json.loads((out / "model.json").read_text())
    assert (load_model_dir(out).cascade is not None) == kept == (out / "stage2.pt").exists()
    assert (out / "stage2_rejected.pt").exists() != kept
    if not kept:
        assert meta["stage2_rejected"] == {
            "stage1_validation_dice": 0.9,
            "stage2_validation_dice": stage2_score,
        }


@pytest.mark.parametrize("key", ["training.learning_rate", "patch.context_scale", "training.max_epochs"])
def test_config_refuses_infinite_and_nan_floats(volumes, tmp_path, key):
    for bad in (float("inf"), float("nan")):
        with pytest.raises(InputError, match=key.replace(".", r"\.")):
            parse_config(_config(volumes, tmp_path / "out", **{key: bad}), "cfg")


def test_training_stops_at_the_first_non_finite_loss(volumes, tmp_path, monkeypatch):
    import meunet.train.loop as loop

    calls = []

    def nan_on_second_step(*args, **kwargs):
        calls.append(1)
        loss = loop_wd_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss  # steps of 2 calls (local, context)

    loop_wd_loss = loop.wd_loss
    monkeypatch.setattr(loop, "wd_loss", nan_on_second_step)
    with pytest.raises(InputError, match="training: non-finite loss at stage 1 step 2"):
        train(parse_config(_config(volumes, tmp_path / "out"), "cfg"))
    assert not (tmp_path / "out" / "checkpoint_stage1.pt").exists()


def test_out_of_fold_falls_back_to_in_fold_output_when_a_fold_has_no_patch(volumes, tmp_path, capfd):
    config = _config(volumes, tmp_path / "m", stages="both", **{"stage2.folds": 3})
    config["data"]["train"] = config["data"]["train"][:1]  # one 32^3 volume: blocks of 10, boxes of 24
    out = train(parse_config(config, "cfg"))
    assert "leaves no training patch outside the region it holds out" in capfd.readouterr().err
    assert "out_of_fold" not in json.loads((out / "model.json").read_text())
    assert (out / "stage1_cache" / "train_0.json").exists()  # the final stage 1's output, keyed as ever


def test_training_images_of_one_value_are_one_line_and_nothing_is_written(volumes, tmp_path):
    write_volume(tmp_path / "flat.npy", Volume(np.full((32, 32, 32), 7, np.uint8)))
    config = _config(volumes, tmp_path / "out")
    config["data"]["train"] = [{"image": str(tmp_path / "flat.npy"), "label": str(volumes / "lab0.npy")}]
    with pytest.raises(InputError) as info:
        train(parse_config(config, "cfg"))
    assert (
        str(info.value)
        == f"{tmp_path / 'flat.npy'}: 99 % of the training voxels are 7: there is nothing to learn from"
    )
    assert not (tmp_path / "out").exists()


def test_a_class_no_training_patch_holds_is_said_before_training(volumes, tmp_path, capfd):
    labels = np.asarray(read_volume(volumes / "lab0.npy").array)
    write_volume(tmp_path / "no_core.npy", Volume(np.minimum(labels, 1).astype(np.uint8)))
    config = _config(volumes, tmp_path / "out", **{"training.max_iterations": 1})
    config["data"]["train"] = [{"image": str(volumes / "img0.npy"), "label": str(tmp_path / "no_core.npy")}]
    train(parse_config(config, "cfg"))
    lines = capfd.readouterr().err.splitlines()
    assert "meunet train: no training patch holds core: the model cannot learn to label it" in lines


def test_training_labels_without_any_foreground_are_one_line_and_nothing_is_written(volumes, tmp_path):
    write_volume(tmp_path / "empty.npy", Volume(np.zeros((32, 32, 32), np.uint8)))
    config = _config(volumes, tmp_path / "out")
    config["data"]["train"] = [{"image": str(volumes / "img0.npy"), "label": str(tmp_path / "empty.npy")}]
    with pytest.raises(InputError) as info:
        train(parse_config(config, "cfg"))
    assert (
        str(info.value) == f"{tmp_path / 'empty.npy'}: no training patch holds ball, core: nothing to learn"
    )
    assert not (tmp_path / "out").exists()


def test_cpu_0_is_the_cpu_and_a_missing_device_is_one_line_naming_the_key():
    from meunet.precision import resolve_device

    assert resolve_device("cpu:0") == torch.device("cpu")  # a model saved from it loads anywhere
    with pytest.raises(InputError, match=r"^device: cuda:99 is not available on this machine$"):
        resolve_device("cuda:99")


@pytest.mark.parametrize("output", ["", "."])
def test_an_empty_output_is_refused_not_the_configurations_folder(volumes, tmp_path, cli, output):
    before = sorted(tmp_path.iterdir())
    result, path = _run(cli, tmp_path, {**_config(volumes, tmp_path), "output": output})
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {path}: output: an empty path or '.' names the configuration's")
    assert sorted(tmp_path.iterdir()) == [*before, path]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"[]", "not a meunet dataset.json: it needs a non-empty list 'volumes'"),
        (
            b'{"volumes": [], "classes": ["a", "b"]}',
            "not a meunet dataset.json: it needs a non-empty list 'volumes'",
        ),
        (b'{"volumes": [{"image": "i.nii"}], "classes": ["a", "b"]}', "volumes[0] needs the paths"),
        (b'{"volumes": [{"image": "i", "label": "l"}], "classes": "ab"}', "'classes' must list two or more"),
        (b'{"volumes": [{"image": "i", "label": "l"}], "classes": ["a", "a"]}', "class name 'a' given twice"),
    ],
)
def test_a_malformed_dataset_json_is_one_line_naming_it(tmp_path, content, message):
    from meunet.train.data import resolve_split

    path = tmp_path / "dataset.json"
    path.write_bytes(content)
    config = parse_config({"output": str(tmp_path / "out"), "data": {"dataset": str(path)}}, "cfg")
    with pytest.raises(InputError, match=re.escape(f"{path}: {message}")):
        resolve_split(config)
