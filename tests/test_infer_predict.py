"""``meunet.infer.predict`` end to end on tiny model directories: wiring, cascade, resume, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from meunet.data.normalization import Normalization
from meunet.errors import InputError
from meunet.infer import Input, Predictor, PredictSettings, SlidingWindow, predict
from meunet.infer.window import labels_from_scores
from meunet.io import Volume, open_volume, read_volume, write_volume
from meunet.models import Cascade, MeUNet, UNet3D, load_model_dir, save_model_dir
from test_infer_window import _one_torch_thread  # noqa: F401 (autouse fixture: one torch thread here too)

WIDTHS = [4, 8, 8, 8, 8]
NORM = Normalization(clip_low=0.0, clip_high=200.0, mean=60.0, std=40.0)


def _model_dir(path: Path, cascade: str | None = None, in_channels: int = 1, stage1_output="probs") -> Path:
    torch.manual_seed(5)  # a seed whose random net predicts more than one class on _image
    stage1 = MeUNet(in_channels, 3, widths=WIDTHS, norm="batch")
    stage2 = None
    if cascade is not None:
        stage2 = Cascade(stage1, UNet3D(in_channels, 3, widths=WIDTHS, norm="batch"), cascade, stage1_output)
    with torch.no_grad():  # untrained heads are dominated by their bias; sharpen them
        for net in (stage1, stage2.stage2) if stage2 else (stage1,):
            net.head.bias.zero_()
            net.head.weight.mul_(10)
    meta = {
        "classes": ["background", "gut", "crop"],
        "normalization": NORM.to_dict(),
        "window": [16, 16, 16],
        "spacing": [1.0, 1.0, 1.0],
    }
    return save_model_dir(path, meta, stage1, stage2)


def _image(path: Path, shape=(40, 20, 24), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 30, shape, dtype=np.uint8)
    array[10:30, 5:15, 6:20] += 120  # a bright object in air
    write_volume(path, Volume(array, spacing=(0.5, 0.25, 0.25)))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"single": _model_dir(root / "single"), "post": _model_dir(root / "post", cascade="post")}


def test_predict_single_stage_matches_engine(models, tmp_path):
    image = _image(tmp_path / "image.nii.gz")
    stats = predict(
        models["single"],
        image,
        tmp_path / "labels.nii.gz",
        stats_json=tmp_path / "stats.json",
        progress=False,
    )
    out = read_volume(tmp_path / "labels.nii.gz")
    assert out.array.dtype == np.uint8 and out.array.shape == (40, 20, 24)
    assert out.spacing == (0.5, 0.25, 0.25)
    bundle = load_model_dir(models["single"])
    expected = SlidingWindow((16, 16, 16), precision="auto").labels(
        bundle.net, [Input(read_volume(image).array, NORM.apply)], 3
    )
    np.testing.assert_array_equal(out.array, expected)
    assert len(np.unique(expected)) > 1  # the random net does not predict one class everywhere
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["windows"] == 4 * 2 * 2 == stats["windows"] and written["windows_skipped"] == 0
    assert written["voxels"] == 40 * 20 * 24 and written["peak_rss_bytes"] > 0
    assert written["voxels_per_second"] == pytest.approx(written["voxels"] / written["seconds"])


@pytest.fixture(scope="module")
def cascade_run(models, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted cascade prediction to Zarr, with probabilities (two chunks of 64 slices deep)."""
    root = tmp_path_factory.mktemp("cascade")
    paths = {"image": _image(root / "image.npy", shape=(80, 16, 16)), "labels": root / "labels.zarr"}
    paths["probs"] = root / "probs.zarr"
    predict(models["post"], paths["image"], paths["labels"], probabilities=paths["probs"], progress=False)
    return paths


def test_predict_cascade_and_probabilities(models, cascade_run):
    assert [
        p.name for p in cascade_run["labels"].parent.iterdir() if p.name.startswith(".")
    ] == []  # no scratch
    bundle = load_model_dir(models["post"])
    engine = SlidingWindow((16, 16, 16), precision="auto")
    image_input = Input(np.load(cascade_run["image"]), NORM.apply)
    stage1 = np.concatenate(
        [
            engine.probabilities_(s).astype(np.float16)
            for _, s in engine.stream(bundle.stage1, [image_input], 3)
        ],
        axis=1,
    )
    inputs = [image_input, Input(stage1)]
    expected = engine.labels(bundle.net, inputs, 3)
    np.testing.assert_array_equal(open_volume(cascade_run["labels"]).array[...], expected)
    probs = zarr.open_array(cascade_run["probs"], mode="r")
    assert probs.shape == (3, 80, 16, 16) and probs.dtype == np.float16
    expected_probs = [
        engine.probabilities_(s).astype(np.float16) for _, s in engine.stream(bundle.net, inputs, 3)
    ]
    np.testing.assert_array_equal(probs[...], np.concatenate(expected_probs, axis=1))
    np.testing.assert_allclose(probs[...].astype(np.float32).sum(0), 1, atol=3e-3)


def test_predict_cascade_on_stage1_features(tmp_path):
    model = _model_dir(tmp_path / "features", cascade="post", stage1_output="features")
    image = _image(tmp_path / "image.npy", shape=(20, 16, 12))
    predict(model, image, tmp_path / "labels.npy", progress=False)
    bundle = load_model_dir(model)
    engine = SlidingWindow((16, 16, 16), precision="auto")
    image_input = Input(np.load(image), NORM.apply)
    features = [
        s.astype(np.float16) for _, s in engine.stream(bundle.stage1.features, [image_input], WIDTHS[0])
    ]
    expected = engine.labels(bundle.net, [image_input, Input(np.concatenate(features, axis=1))], 3)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)


def test_skip_empty_counts_air_windows(models, tmp_path):
    image = tmp_path / "air.npy"
    array = np.full((48, 16, 16), 5, np.uint8)
    array[:8, 4:12, 4:12] = 150
    np.save(image, array)
    stats = predict(models["single"], image, tmp_path / "l.npy", skip_empty=True, progress=False)
    assert stats["windows"] == 5 and stats["windows_skipped"] == 4  # z starts 0, 8, ..., 32; only 0 sees it
    labels = np.load(tmp_path / "l.npy")
    assert (labels[24:] == 0).all()


def test_bad_inputs_are_input_errors(models, tmp_path):
    image = _image(tmp_path / "image.npy")
    with pytest.raises(InputError, match="model directory not found"):
        predict(tmp_path / "nowhere", image, tmp_path / "a.npy", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        predict(broken, image, tmp_path / "a.npy", progress=False)
    no_norm = tmp_path / "no_norm"
    shutil.copytree(models["single"], no_norm)
    meta = json.loads((no_norm / "model.json").read_text())
    del meta["normalization"]
    (no_norm / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="no valid 'normalization'"):
        predict(no_norm, image, tmp_path / "a.npy", progress=False)
    two = _model_dir(tmp_path / "two", in_channels=2)
    with pytest.raises(InputError, match="2 input channels"):
        predict(two, image, tmp_path / "a.npy", progress=False)
    with pytest.raises(InputError, match="unknown blend 'median'"):
        predict(models["single"], image, tmp_path / "a.npy", blend="median", progress=False)
    for device, message in (
        ("nodevice", "--device: must be auto, cpu, cuda, cuda:N or mps, not 'nodevice'"),
        ("meta", "not 'meta'"),  # the memory planner's device: it holds no voxels
        ("cuda:x", "not 'cuda:x'"),
        ("mps", "--device: mps is not available on this machine"),
    ):
        if device == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(InputError, match=re.escape(message)):
            predict(models["single"], image, tmp_path / "a.npy", device=device, progress=False)
    for device in ("cpu", "cpu:0"):  # torch's name of the CPU is the CPU
        predict(models["single"], image, tmp_path / f"{device}.npy", device=device, progress=False)
    assert np.array_equal(np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "cpu:0.npy"))
    (tmp_path / "exists.npy").write_bytes(b"x")
    with pytest.raises(InputError, match="exists"):
        predict(models["single"], image, tmp_path / "exists.npy", progress=False)
    assert not (tmp_path / "a.npy").exists()


def test_the_device_auto_by_default_is_cuda_where_there_is_one_and_the_cpu_elsewhere(monkeypatch):
    assert PredictSettings().device == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert PredictSettings().device == "cuda"
    assert PredictSettings(device="cpu").device == "cpu"


def test_memory_estimate_above_available_stops(models, tmp_path, monkeypatch):
    class Tiny:
        available = 1000

    monkeypatch.setattr("psutil.virtual_memory", lambda: Tiny)
    image = _image(tmp_path / "image.npy")
    with pytest.raises(InputError, match=r"needs about \d+\.\d+ GiB"):
        predict(models["single"], image, tmp_path / "a.zarr", progress=False)
    assert not (tmp_path / "a.zarr").exists()
    predict(models["single"], image, tmp_path / "a.zarr", progress=False, force=True)
    assert (tmp_path / "a.zarr").is_dir()


KILLER = """
import os, signal, sys
from meunet.io._zarr import ZarrWriter
from meunet.infer import predict

original, count = ZarrWriter.write, [0]

def write_then_die(self, z0, slab):
    original(self, z0, slab)
    count[0] += 1
    if count[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)

ZarrWriter.write = write_then_die
predict(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


def test_killed_zarr_prediction_resumes_to_same_labels(models, cascade_run, tmp_path):
    output = tmp_path / "out.zarr"
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    env = {
        **os.environ,
        "KILL_AFTER": "1",
        "OMP_NUM_THREADS": "1",
    }  # chunks of 64 slices: the first of two writes lands, then death
    args = [sys.executable, script, models["post"], cascade_run["image"], output]
    assert subprocess.run(args, env=env, check=False).returncode == -9
    assert not output.exists() and (tmp_path / ".out.zarr.partial").is_dir()
    for other in ({"model_dir": models["single"]}, {"overlap": 0.25}):
        args = {"model_dir": models["post"], **other}
        with pytest.raises(InputError, match="made by another model, input or settings"):
            predict(input=cascade_run["image"], output=output, progress=False, resume=True, **args)
    stats = predict(models["post"], cascade_run["image"], output, progress=False, resume=True)
    assert (
        stats["windows"] == 2 + 3
    )  # rows reaching past z = 64 (starts 56, 64), stage 1 past 56 (48, 56, 64)
    np.testing.assert_array_equal(
        open_volume(output).array[...], open_volume(cascade_run["labels"]).array[...]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killer.py", "out.zarr"]  # no scratch left behind


def test_cli_predict_and_bad_input_lines(cli, models, tmp_path):
    image = _image(tmp_path / "image.npy")
    result = cli(
        "predict", models["single"], image, tmp_path / "labels.nii", "--stats-json", tmp_path / "s.json"
    )
    assert result.exit_code == 0, result.stderr
    assert "estimated peak memory" in result.stderr and "wrote" in result.stdout
    assert read_volume(tmp_path / "labels.nii").array.shape == (40, 20, 24)
    assert json.loads((tmp_path / "s.json").read_text())["voxels"] == 40 * 20 * 24
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text('{"stage1": {"n_classes": 3}, "classes": ["a"]}')
    two = _model_dir(tmp_path / "two", in_channels=2)
    cases = {
        "model directory not found": (tmp_path / "nowhere", image, tmp_path / "a.npy"),
        "classes": (broken, image, tmp_path / "a.npy"),
        "2 input channels": (two, image, tmp_path / "a.npy"),
        "output exists": (models["single"], image, tmp_path / "labels.nii"),
    }
    for message, args in cases.items():
        result = cli("predict", *args, "--no-progress")
        assert result.exit_code == 2, message
        assert (
            result.stderr.count("\n") == 1
            and result.stderr.startswith("error: ")
            and message in result.stderr
        )
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.parametrize("model", ["single", "post"])
def test_predictor_built_once_serves_two_inputs_as_predict_does(models, tmp_path, monkeypatch, model):
    import meunet.models

    loads = []
    original = meunet.models.load_model_dir
    monkeypatch.setattr(meunet.models, "load_model_dir", lambda *a: loads.append(a) or original(*a))
    images = [_image(tmp_path / f"image{i}.npy", seed=i) for i in (0, 1)]
    predictor = Predictor(models[model], PredictSettings(overlap=0.25))
    assert predictor.settings.window == (16, 16, 16) and len(loads) == 1
    for i, image in enumerate(images):
        predictor.predict(image, tmp_path / f"once{i}.npy", progress=False)
        predict(models[model], image, tmp_path / f"each{i}.npy", overlap=0.25, progress=False)
        once, each = (np.load(tmp_path / f"{k}{i}.npy") for k in ("once", "each"))
        assert len(np.unique(once)) > 1 or model == "post"  # the random cascade predicts background
        np.testing.assert_array_equal(once, each)
        np.testing.assert_array_equal(predictor.labels(np.load(image)), each)
    assert len(loads) == 3  # the predictor's, and one per predict() call


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("overlap", 1.5, "overlap must lie in [0, 1)"),
        ("blend", "median", "unknown blend 'median'"),
        ("precision", "fp8", "precision must be one of"),
        ("window", (0, 16, 16), "window must be three positive sizes"),
        ("window", (4, 16, 16), "every side must be at least 16"),
    ],
)
def test_invalid_settings_are_one_input_error_line(cli, models, tmp_path, option, value, message):
    with pytest.raises(InputError, match=re.escape(message)):
        PredictSettings(**{option: value})
    image = _image(tmp_path / "image.npy")
    words = [str(v) for v in value] if option == "window" else [str(value)]
    result = cli(
        "predict", models["single"], image, tmp_path / "a.npy", f"--{option}", *words, "--no-progress"
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: settings: ") and message in result.stderr
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--overlap", "0.999"),
            r"overlap 0.999 places 188,752,251 windows .* at most 1,000\): use an overlap",
        ),
        (
            ("--window", "4000", "4000", "4000"),
            r"window \(4000, 4000, 4000\) needs about \d+\.\d+ GiB, more than the budget of \d+\.\d+ GiB "
            r"\(90% of the \d+\.\d+ GiB available\); the largest window that fits is \(16, 16, 16\)",
        ),
    ],
)
def test_absurd_window_counts_and_sizes_are_refused_before_any_work(cli, models, tmp_path, args, message):
    """An overlap near 1 (millions of windows) or a window of 4000^3 (a 238 GiB importance map, made only
    after the memory estimate) is one line, and nothing is written."""
    image = _image(tmp_path / "image.npy")
    result = cli("predict", models["single"], image, tmp_path / "a.npy", *args, "--no-progress")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and re.search(message, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy"]


def test_an_output_in_or_around_an_input_or_given_twice_is_refused_even_with_force(cli, models, tmp_path):
    image = _image(tmp_path / "image.npy")
    truth = _image(tmp_path / "truth.npy")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model_files = {p.name: p.read_bytes() for p in models["single"].iterdir() if p.is_file()}
    cases = {
        "is, holds or lies in an input": ("predict", models["single"], image, image),
        "is, holds or lies in an input ": ("predict", models["single"], image, tmp_path),  # its folder
        "is, holds or lies in an input  ": ("predict", models["single"], image, tmp_path / "a.npy",
                                            "--stats-json", models["single"] / "model.json"),
        "is, holds or lies in an input   ": ("predict", models["single"], image, models["single"]),
        "given for two outputs": ("predict", models["single"], image, tmp_path / "a.json", "--stats-json",
                                  tmp_path / "a.json"),
        "given for two outputs ": ("predict", models["single"], image, tmp_path / "a.zarr", "--probabilities",
                                   tmp_path / "a.zarr"),
        "is, holds or lies in an input    ": ("evaluate", truth, truth, "--json", truth),
    }  # fmt: skip
    for message, args in cases.items():
        result = cli(*args, "--force")
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message.strip() in result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert {p.name: p.read_bytes() for p in models["single"].iterdir() if p.is_file()} == model_files


def test_an_output_in_a_folder_that_does_not_exist_is_one_line_before_any_work(cli, models, tmp_path):
    image = _image(tmp_path / "image.npy")
    truth = _image(tmp_path / "truth.npy")
    missing = tmp_path / "missing"
    cases = [
        ("predict", models["single"], image, tmp_path / "a.npy", "--stats-json", missing / "s.json"),
        ("predict", models["single"], image, tmp_path / "a.zarr", "--probabilities", missing / "p.zarr"),
        ("evaluate", truth, truth, "--json", missing / "e.json"),
    ]
    for args in cases:
        result = cli(*args, "--no-progress" if args[0] == "predict" else "--force")
        assert (
            result.exit_code == 2 and result.stderr == f"error: {missing}: the output folder does not exist\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy", "truth.npy"]


def test_probabilities_keep_the_inputs_geometry(models, tmp_path):
    image = _image(tmp_path / "image.nii.gz")
    predict(models["single"], image, tmp_path / "l.npy", probabilities=tmp_path / "p.zarr", progress=False)
    probs = zarr.open_array(tmp_path / "p.zarr", mode="r")
    assert probs.shape == (3, 40, 20, 24) and probs.dtype == np.float16
    assert probs.attrs["meunet"]["spacing"] == [0.5, 0.25, 0.25]
    np.testing.assert_allclose(probs[...].astype(np.float32).sum(axis=0), 1, atol=3e-3)


def test_predict_refuses_a_nan_voxel_naming_the_input(models, tmp_path):
    array = np.full((40, 20, 24), 50.0, np.float32)
    array[33, 4, 5] = np.nan
    write_volume(tmp_path / "nan.npy", Volume(array))
    with pytest.raises(InputError, match=r"nan\.npy: NaN or infinite voxel in slice z = 33"):
        predict(models["single"], tmp_path / "nan.npy", tmp_path / "labels.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]


def _edited_model(models, tmp_path, edit) -> Path:
    model = tmp_path / "model"
    shutil.copytree(models["single"], model)
    meta = json.loads((model / "model.json").read_text())
    edit(meta)
    (model / "model.json").write_text(json.dumps(meta))
    return model


@pytest.mark.parametrize(
    ("key", "value"),
    [("std", 0.0), ("std", float("nan")), ("std", float("inf")), ("clip_high", 1e308), ("std", 1e-300)],
)
def test_predict_refuses_bad_normalization_naming_model_json(models, tmp_path, key, value):
    """Not finite, or finite but overflowing float32 when applied (every voxel would become inf)."""
    model = _edited_model(models, tmp_path, lambda meta: meta["normalization"].update({key: value}))
    with pytest.raises(InputError, match=r"model\.json: no valid 'normalization'"):
        predict(model, _image(tmp_path / "image.npy"), tmp_path / "labels.zarr", progress=False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", 99, "'format_version' 99 is not one this meunet reads"),
        ("spacing", [0, 0, 0], "'spacing' must be three positive finite numbers"),
        ("spacing", [1, 1, float("inf")], "'spacing' must be three positive finite numbers"),
    ],
)
def test_a_model_json_of_a_newer_format_or_with_bad_spacing_is_refused(models, tmp_path, key, value, message):
    model = _edited_model(models, tmp_path, lambda meta: meta.update({key: value}))
    with pytest.raises(InputError, match=re.escape(message)):
        Predictor(model)


def test_a_stored_window_larger_than_the_volume_is_cut_to_it(models, tmp_path):
    """A model.json window of 100000 would pad a 40 x 20 x 24 volume to 100000^3 (and the memory guard
    would look for the largest window below it): it is cut to the volume, each side a multiple of 16."""
    model = _edited_model(models, tmp_path, lambda meta: meta.update(window=[100000] * 3))
    choice = Predictor(model).window_for((40, 20, 24))
    assert choice.window == (48, 32, 32) and choice.how == "the model's, cut to the volume"
    stats = predict(model, _image(tmp_path / "image.npy"), tmp_path / "labels.npy", progress=False)
    assert stats["window"] == [48, 32, 32] and stats["windows"] == 1


def test_resume_with_nothing_to_resume_is_refused(cli, models, tmp_path):
    image = _image(tmp_path / "image.npy")
    result = cli("predict", models["single"], image, tmp_path / "a.zarr", "--resume", "--no-progress")
    assert result.exit_code == 2
    assert (
        result.stderr == f"error: {tmp_path / 'a.zarr'}: nothing to resume: no partial output of an "
        "interrupted run is here\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy"]


def test_force_replaces_only_meunets_outputs_never_a_users_folder(cli, models, tmp_path):
    """--force replaces an earlier output (a Zarr store, a slice folder, a file, a link), never a folder
    holding anything else, and never writes into a folder named like a file."""
    image = _image(tmp_path / "image.npy")
    args = ("predict", models["single"], image)
    for out in ("a.zarr", "slices", "a.nii.gz"):
        assert cli(*args, tmp_path / out, "--no-progress").exit_code == 0
        again = cli(*args, tmp_path / out, "--no-progress", "--force")
        assert again.exit_code == 0, again.stderr
    (tmp_path / "theses").mkdir()
    (tmp_path / "theses" / "chapter1.tex").write_text("years of work")
    (tmp_path / "u.nii.gz" / "sub").mkdir(parents=True)
    (tmp_path / "u.nii.gz" / "sub" / "x.txt").write_text("x")
    (tmp_path / "a.zarr" / "notes.txt").write_text("mine")  # a user's file inside an earlier output
    for out, foreign in (("theses", "chapter1.tex"), ("u.nii.gz", "sub/x.txt"), ("a.zarr", "notes.txt")):
        result = cli(*args, tmp_path / out, "--no-progress", "--force")
        assert result.exit_code == 2 and result.stderr == (
            f"error: {tmp_path / out}: holds {foreign}, which meunet did not write: --force replaces only "
            "meunet's outputs; move it away or choose another output name\n"
        )
    assert (tmp_path / "theses" / "chapter1.tex").read_text() == "years of work"
    assert (tmp_path / "u.nii.gz" / "sub" / "x.txt").is_file() and (
        tmp_path / "a.zarr" / "notes.txt"
    ).is_file()
    os.symlink(tmp_path / "nowhere" / "x.nii.gz", tmp_path / "link.nii.gz")  # a dangling link is an output
    result = cli(*args, tmp_path / "link.nii.gz", "--no-progress")
    assert result.exit_code == 2 and "output exists; use --force" in result.stderr
    assert cli(*args, tmp_path / "link.nii.gz", "--no-progress", "--force").exit_code == 0
    assert not (tmp_path / "link.nii.gz").is_symlink() and not (tmp_path / "nowhere").exists()
    here = os.getcwd()
    os.chdir(tmp_path / "theses")
    try:
        for out in (".", ""):
            result = cli(*args, out, "--no-progress", "--force")
            assert (
                result.exit_code == 2
                and result.stderr == "error: .: is not an output name: give a file or folder name\n"
            )
    finally:
        os.chdir(here)
    assert sorted(p.name for p in (tmp_path / "theses").iterdir()) == ["chapter1.tex"]


def test_labels_beyond_256_classes_are_uint16():
    scores = np.zeros((300, 2, 3, 3), np.float32)
    scores[299, 1] = 1.0
    labels = labels_from_scores(scores)
    assert labels.dtype == np.uint16 and labels.max() == 299
    assert labels_from_scores(scores[:256]).dtype == np.uint8


def test_reading_ahead_and_writing_behind_give_the_synchronous_labels(models, tmp_path, monkeypatch):
    """The overlapped pipeline (next row's slices read on a thread, each piece written on another) against
    the same run with both switched off: identical labels and probabilities of a cascade."""
    import importlib
    import threading

    from meunet.infer import window as window_module
    from meunet.io import VolumeWriter, WriteBehind

    image = _image(tmp_path / "image.nii.gz", shape=(150, 20, 24))  # three pieces of 64-deep Zarr chunks
    threads: dict[str, set[str]] = {"read": set(), "write": set()}
    read, write = window_module._SlabCache._read, VolumeWriter.write

    def recorded_read(self, z0, z1):
        threads["read"].add(threading.current_thread().name)
        return read(self, z0, z1)

    def recorded_write(self, z0, slab):
        threads["write"].add(threading.current_thread().name)
        return write(self, z0, slab)

    monkeypatch.setattr(window_module._SlabCache, "_read", recorded_read)
    monkeypatch.setattr(VolumeWriter, "write", recorded_write)
    kwargs = {"window": (16, 16, 16), "progress": False, "postprocess": False}
    predict(models["post"], image, tmp_path / "a.zarr", probabilities=tmp_path / "pa.zarr", **kwargs)
    assert {n.split("_")[0] for n in threads["read"]} == {"MainThread", "meunet-reader"}
    assert {n.split("_")[0] for n in threads["write"]} == {"meunet-writer"}
    assert open_volume(tmp_path / "a.zarr").array.chunks[0] == 64

    class Synchronous(WriteBehind):
        def write(self, z0, pieces):
            self._write(z0, pieces)

    threads = {"read": set(), "write": set()}
    monkeypatch.setattr(window_module._SlabCache, "read_ahead", lambda *args: None)
    monkeypatch.setattr(importlib.import_module("meunet.infer.predict"), "WriteBehind", Synchronous)
    predict(models["post"], image, tmp_path / "b.zarr", probabilities=tmp_path / "pb.zarr", **kwargs)
    assert threads == {"read": {"MainThread"}, "write": {"MainThread"}}
    assert np.array_equal(read_volume(tmp_path / "a.zarr").array, read_volume(tmp_path / "b.zarr").array)
    assert np.array_equal(
        zarr.open_array(tmp_path / "pa.zarr")[...], zarr.open_array(tmp_path / "pb.zarr")[...]
    )


def test_a_failed_write_behind_stops_the_run_and_leaves_nothing(models, tmp_path, monkeypatch):
    from meunet.io import VolumeWriter

    image = _image(tmp_path / "image.nii.gz", shape=(40, 20, 24))
    write = VolumeWriter.write

    def failing(self, z0, slab):
        if z0 > 0:
            raise InputError(self.path, "no space left on the device")
        return write(self, z0, slab)

    monkeypatch.setattr(VolumeWriter, "write", failing)
    with pytest.raises(InputError, match="no space left"):
        predict(models["single"], image, tmp_path / "a.npy", window=(16, 16, 16), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nii.gz"]
