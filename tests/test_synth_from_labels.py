"""``meunet synth from-labels``: exact labels, attenuation order, seeds, beam hardening, bad input; and the
median + multi-Otsu baseline (``meunet.baseline``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from meunet.baseline import ThresholdBaseline
from meunet.errors import InputError
from meunet.io import Volume, read_volume, write_volume
from meunet.metrics import confusion_matrix, dice_from_confusion
from meunet.synth import Acquisition, from_labels
from meunet.synth.acquisition import scan
from meunet.synth.labels import LabelPhantom, class_names
from meunet.train import parse_config

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "real_vs_threshold.py"


def _label_map(shape=(20, 40, 40)) -> np.ndarray:
    """(Z, Y, X) uint8: 0 outside a cylinder along z, 1 inside, 2 in a ball and 3 in a slab across it."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    labels = np.zeros(shape, np.uint8)
    labels[:, np.hypot(y - cy, x - cx)[0] < 0.4 * shape[1]] = 1
    labels[(z - shape[0] / 2) ** 2 + (y - cy) ** 2 + (x - cx - 6) ** 2 < 36] = 2
    labels[:, 4:9, 12:20] = 3
    return labels


@pytest.fixture()
def label_file(tmp_path):
    path = tmp_path / "src" / "labels.nii"
    path.parent.mkdir()
    write_volume(path, Volume(_label_map(), spacing=(0.5, 0.25, 0.25)))
    return path


def _means(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([image[labels == c].mean() for c in range(labels.max() + 1)])


def test_labels_exact_means_in_attenuation_order_and_seeded(label_file, tmp_path):
    paths = [from_labels(label_file, tmp_path / name, seed=seed, fmt="nii") for name, seed in
             (("a", 3), ("b", 3), ("c", 4))]  # fmt: skip
    meta = json.loads(paths[0].read_text())
    assert meta["kind"] == "from-labels" and meta["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert meta["volumes"] == [{"image": "img_000.nii", "label": "lab_000.nii", "seed": 3}]
    assert meta["parameters"]["attenuation_from"] == "seed" and meta["shape"] == [20, 40, 40]
    image, labels = (read_volume(tmp_path / "a" / meta["volumes"][0][k]) for k in ("image", "label"))
    assert labels.array.dtype == np.uint8 and np.array_equal(labels.array, _label_map())
    assert image.array.dtype == np.uint8 and image.spacing == labels.spacing == (0.5, 0.25, 0.25)
    levels = np.array(meta["parameters"]["attenuation"])
    assert np.all(np.diff(levels) > 0), "drawn levels increase with the label value"
    assert np.array_equal(np.argsort(_means(image.array, labels.array)), np.argsort(levels))
    for name in ("img_000.nii", "lab_000.nii", "dataset.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "img_000.nii").read_bytes() != (tmp_path / "c" / "img_000.nii").read_bytes()


def test_levels_follow_the_original_scans_class_order(label_file, tmp_path):
    scan_file = tmp_path / "scan.npy"
    order = np.array([120, 30, 200, 80], np.uint8)  # class 1 darkest, then 3, 0, 2
    write_volume(scan_file, Volume(order[_label_map()]))
    path = from_labels(label_file, tmp_path / "out", image=scan_file, classes=["a", "b", "c", "d"], fmt="nii")
    meta = json.loads(path.read_text())
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["parameters"]["attenuation_from"] == "image"
    levels = np.array(meta["parameters"]["attenuation"])
    assert np.array_equal(np.argsort(levels), np.argsort(order)) and levels.min() == 0.08
    image = read_volume(tmp_path / "out" / "img_000.nii").array
    assert np.array_equal(np.argsort(_means(image, _label_map())), np.argsort(order))


def test_physics_shows_beam_hardening_in_a_homogeneous_cylinder(tmp_path):
    y, x = np.ogrid[:64, :64]
    radius = np.hypot(y - 31.5, x - 31.5)
    labels = np.broadcast_to((radius < 26).astype(np.uint8), (3, 64, 64))
    write_volume(tmp_path / "cylinder.npy", Volume(np.ascontiguousarray(labels)))
    from_labels(tmp_path / "cylinder.npy", tmp_path / "out", physics=True, workers=1, fmt="nii")
    image = read_volume(tmp_path / "out" / "img_000.nii").array.astype(float)
    centre, rim = image[:, radius < 6].mean(), image[:, (radius > 18) & (radius < 23)].mean()
    assert centre < 0.985 * rim, f"no cupping: centre {centre:.1f}, rim {rim:.1f}"
    # A denser material hardens the beam more (no correction in the filtered back-projection).
    dense = LabelPhantom(labels, 0, ("air", "solid"), (0.08, 0.85), (1, 1))
    image = scan(dense, Acquisition(physics=True), 0, 3)[0].astype(float)
    assert image[:, radius < 6].mean() < 0.95 * image[:, (radius > 18) & (radius < 23)].mean()


def test_class_names_from_a_readme_or_a_dataset_json(tmp_path, real_data):
    assert class_names(real_data / "qim3d" / "fly_150x256x256_silver3.tif", 3) == [
        "air/background",
        "soft tissue",
        "dense cuticle",
    ]
    assert class_names(real_data / "totalsegmentator" / "example_seg.nii.gz", 118)[:2] == [
        "class_0",
        "class_1",
    ]
    (tmp_path / "dataset.json").write_text(
        json.dumps({"classes": ["x", "y"], "volumes": [{"label": "l.nii"}]})
    )
    assert class_names(tmp_path / "l.nii", 2) == ["x", "y"]
    assert class_names(tmp_path / "other.nii", 2) == ["class_0", "class_1"]


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.full((8, 16, 16), 0.5, np.float32), "not whole numbers"),
        (np.where(_label_map() > 0, 300, 0).astype(np.uint16), "more than 255 classes"),
        (np.where(_label_map() > 0, -1, 0).astype(np.int16), "negative"),
        (np.zeros((8, 16, 16), np.uint8), "a single class"),
        (np.random.default_rng(0).integers(0, 200, (8, 16, 16), dtype=np.uint8), "an intensity image"),
    ],
)
def test_bad_label_maps(labels, message, tmp_path, cli):
    path = tmp_path / "labels.npy"
    write_volume(path, Volume(labels))
    with pytest.raises(InputError, match=message):
        from_labels(path, tmp_path / "out")
    result = cli("synth", "from-labels", path, tmp_path / "out", "--no-progress")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments_and_existing_output(label_file, tmp_path, cli):
    small = tmp_path / "small.npy"
    write_volume(small, Volume(np.zeros((4, 8, 8), np.uint8)))
    infinite = tmp_path / "infinite.npy"
    scan = np.ones(_label_map().shape, np.float32)
    scan[7, 3, 3] = np.inf
    write_volume(infinite, Volume(scan))
    for kwargs, message in (
        ({"image": small}, "differs from the labels'"),
        ({"image": infinite}, "infinite.npy: NaN or infinite voxel in slice z = 7"),
        ({"classes": ["a", "b"]}, "2 class names given for 4"),
        ({"fmt": "png"}, "unknown format"),
    ):
        with pytest.raises(InputError, match=message):
            from_labels(label_file, tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()
    out = tmp_path / "out"
    first = cli("synth", "from-labels", label_file, out, "--class-names", "a,b,c,d", "--no-progress")
    assert first.exit_code == 0, first.stderr
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["a", "b", "c", "d"]
    again = cli("synth", "from-labels", label_file, out, "--no-progress")
    assert again.exit_code == 2 and "use --force" in again.stderr
    forced = cli("synth", "from-labels", label_file, out, "--force", "--seed", "1", "--no-progress")
    assert forced.exit_code == 0, forced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "img_000.nii.gz", "lab_000.nii.gz"]


@pytest.mark.parametrize("levels", [(60, 160), (170, 50)])
def test_threshold_baseline_on_a_two_phase_volume(levels):
    rng = np.random.default_rng(1)
    z, y, x = np.ogrid[:40, :32, :32]
    labels = ((np.sin(z / 3.0) + np.cos(y / 4.0) + np.sin(x / 5.0)) > 0.4).astype(np.uint8)
    image = np.asarray(levels, np.float32)[labels] + rng.normal(0, 20, labels.shape).astype(np.float32)
    baseline = ThresholdBaseline.fit(image[:20], labels[:20], 2)
    predicted = baseline.predict(image[20:])
    assert predicted.dtype == np.uint8 and predicted.shape == (20, 32, 32)
    dice = dice_from_confusion(confusion_matrix(predicted, labels[20:], 2))
    assert dice.min() > 0.97, dice


def test_benchmark_recipe_is_a_valid_config_and_takes_overrides(tmp_path):
    spec = importlib.util.spec_from_file_location("real_vs_threshold", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pair = {"image": str(tmp_path / "img.npy"), "label": str(tmp_path / "lab.npy")}
    mapping = bench.recipe(pair, pair, ["a", "b"], tmp_path / "model", iterations=200)
    changed = bench.override(mapping, ["training.learning_rate=2e-3", "model.norm=batch", "stages=1"])
    config = parse_config(changed, "recipe")
    assert config.model.widths == [8, 16, 32, 64, 64] and config.patch.size == (32, 32, 32)
    assert config.training.batch_size == 4 and config.training.max_iterations == 200
    assert config.training.validate_every == 50 and parse_config(mapping, "recipe").stages == "both"
    assert config.training.learning_rate == 2e-3 and config.model.norm == "batch" and config.stages == "1"
    assert "learning_rate" not in mapping["training"], "the recipe itself is left as it was"
