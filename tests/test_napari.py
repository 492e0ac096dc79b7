"""The napari plugin in a real viewer (under Xvfb, as ``make test`` runs it): reader for each format,
writer, sample data, the segmentation widget (equal to ``meunet predict``, cancel) and the evaluation
widget; the manifest."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("napari", reason="the napari extra (meunet[napari]) is not installed")

import dask.array as da
from matplotlib import colormaps

from meunet.infer import predict
from meunet.io import Volume, open_volume, read_volume, write_volume
from meunet.metrics import evaluate_labels
from meunet.napari._widgets import EvaluateWidget, SegmentWidget
from test_infer_predict import _image, _model_dir
from test_infer_window import _one_torch_thread  # noqa: F401 (autouse: one torch thread)

SPACING = (0.5, 0.25, 0.25)
FORMATS = ["scan.nii.gz", "scan.tif", "scan.zarr", "scan.npy", "scan.nrrd", "scan.mha", "slices"]


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 250, (20, 12, 16), dtype=np.uint8)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:16, 2:10, 3:12] = 1
    labels[8:12, 4:8, 5:9] = 2
    return image, labels


@pytest.mark.parametrize("name", FORMATS)
def test_reader_opens_each_format(make_napari_viewer, tmp_path, volumes, name):
    image, labels = volumes
    write_volume(tmp_path / name, Volume(image, spacing=SPACING, origin=(1.0, 2.0, 3.0)))
    (tmp_path / "labels").mkdir()
    label_path = tmp_path / "labels" / f"lab_{name}"
    write_volume(label_path, Volume(labels, spacing=SPACING))
    (tmp_path / "labels" / "dataset.json").write_text(json.dumps({"classes": ["background", "gut", "crop"]}))
    viewer = make_napari_viewer()
    (img,) = viewer.open(tmp_path / name, plugin="meunet")
    (lab,) = viewer.open(label_path, plugin="meunet")
    assert img._type_string == "image" and lab._type_string == "labels"
    np.testing.assert_array_equal(np.asarray(img.data), image)
    np.testing.assert_array_equal(np.asarray(lab.data), labels)
    geometry = open_volume(tmp_path / name)  # what the format keeps of the geometry
    np.testing.assert_allclose(img.scale, geometry.spacing)
    np.testing.assert_allclose(img.translate, geometry.origin)
    if name not in ("scan.nrrd",):  # NRRD is read whole; the others stay on disk until sliced
        assert isinstance(img.data, da.Array)
    assert list(lab.features["class"]) == ["background", "gut", "crop"]
    np.testing.assert_allclose(lab.colormap.map(np.array([1]))[0, :3], colormaps["tab10"].colors[0])
    assert lab.colormap.map(np.array([0]))[0, 3] == 0  # background transparent


def test_reader_ome_zarr_pyramid_is_multiscale(make_napari_viewer, tmp_path, volumes):
    image, _ = volumes
    path = tmp_path / "pyramid.zarr"
    write_volume(path, Volume(image, spacing=SPACING))
    group = zarr.open_group(path, mode="r+")
    group.create_array("1", data=image[::2, ::2, ::2])
    attrs = dict(group.attrs)
    attrs["ome"]["multiscales"][0]["datasets"].append(
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [2 * s for s in SPACING]}]}
    )
    group.attrs.update(attrs)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin="meunet")
    assert layer.multiscale and len(layer.data) == 2
    assert all(isinstance(level, da.Array) for level in layer.data)
    np.testing.assert_array_equal(np.asarray(layer.data[1]), image[::2, ::2, ::2])
    np.testing.assert_allclose(layer.scale, SPACING)


def test_writer_and_sample_data(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image, labels = viewer.open_sample("meunet", "fly")
    assert image.data.shape == labels.data.shape == (96, 48, 48)
    assert set(np.unique(labels.data)) == {0, 1, 2} and list(labels.features["class"]) == [
        "background", "gut", "crop",
    ]  # fmt: skip
    labels.scale = SPACING
    for name in ("fly.nii.gz", "fly.zarr", "fly.tif"):
        written = labels.save(str(tmp_path / name), plugin="meunet")
        assert written == [str(tmp_path / name)]
        volume = read_volume(tmp_path / name)
        np.testing.assert_array_equal(volume.array, labels.data)
        np.testing.assert_allclose(volume.spacing, SPACING)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory) -> Path:
    # stage-1 features: a seed-5 cascade that predicts more than one class on _image
    return _model_dir(tmp_path_factory.mktemp("model") / "post", cascade="post", stage1_output="features")


def _run(qtbot, widget) -> None:
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)


def test_segment_widget_equals_predict(make_napari_viewer, qtbot, tmp_path, cascade):
    image_path = _image(tmp_path / "image.nii.gz")
    expected = tmp_path / "expected.nii.gz"
    predict(cascade, image_path, expected, progress=False)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(image_path, plugin="meunet")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_dir.value = cascade
    widget.image.value = layer
    widget.save_to.value = tmp_path / "saved.zarr"
    _run(qtbot, widget)
    assert widget.status.value == f"done: {layer.name} meunet", widget.status.value
    result = viewer.layers[f"{layer.name} meunet"]
    np.testing.assert_array_equal(result.data, read_volume(expected).array)
    assert len(np.unique(result.data)) > 1
    assert list(result.features["class"]) == ["background", "gut", "crop"]
    np.testing.assert_allclose(result.scale, layer.scale)
    np.testing.assert_array_equal(read_volume(tmp_path / "saved.zarr").array, result.data)
    assert widget.progress.value == 100 and widget.run.enabled and not widget.cancel.enabled


def test_segment_widget_cancel_and_bad_model(make_napari_viewer, qtbot, tmp_path, cascade):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 32, 32), np.uint8), name="scan")
    widget = SegmentWidget(viewer)
    widget.model_dir.value = cascade
    widget.start()
    widget.cancel.clicked.emit()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.value == "cancelled" and len(viewer.layers) == 1
    widget.model_dir.value = tmp_path
    _run(qtbot, widget)
    assert widget.status.value.startswith("error:") and "not a meunet model" in widget.status.value


def test_evaluate_widget_dice_table(make_napari_viewer, qtbot, volumes):
    _, truth = volumes
    pred = truth.copy()
    pred[4:8] = 0
    viewer = make_napari_viewer()
    widget = EvaluateWidget(viewer)
    viewer.add_labels(pred, name="pred", scale=SPACING)
    viewer.add_labels(
        truth, name="truth", scale=SPACING, features={"index": [0, 1, 2], "class": ["bg", "gut", "crop"]}
    )
    widget.prediction.value, widget.truth.value = viewer.layers["pred"], viewer.layers["truth"]
    _run(qtbot, widget)
    rows = widget.table.data.to_list()
    expected = evaluate_labels(pred, truth, SPACING)["classes"]
    assert [r[0] for r in rows] == ["bg", "gut", "crop"]
    assert [r[1] for r in rows] == [round(c["dice"], 4) for c in expected]
    assert rows[1][1] < 1.0 and rows[2][1] == 1.0


def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    run = subprocess.run([npe2, "validate", "meunet"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "valid" in run.stdout, run.stdout + run.stderr


def test_segment_applies_the_post_processing_rules_as_predict_does(tmp_path, cascade):
    import shutil

    from meunet.napari._segment import segment

    image_path = _image(tmp_path / "image.nii.gz")
    raw, _ = segment(cascade, read_volume(image_path).array)
    import cc3d

    from meunet.infer.postprocess import CONNECTIVITY

    present = next(c for c in (1, 2) if (raw == c).any())
    # a size rule just above the class's smallest component removes something whatever the model predicted
    smallest = int(
        np.bincount(cc3d.connected_components(raw == present, connectivity=CONNECTIVITY).ravel())[1:].min()
    )
    model = tmp_path / "model"
    shutil.copytree(cascade, model)
    meta = json.loads((model / "model.json").read_text())
    meta["postprocessing"] = {str(present): {"min_size": smallest + 1}}
    (model / "model.json").write_text(json.dumps(meta))
    predict(model, image_path, tmp_path / "expected.nii.gz", progress=False)
    labels, _ = segment(model, read_volume(image_path).array)
    np.testing.assert_array_equal(labels, read_volume(tmp_path / "expected.nii.gz").array)
    assert not np.array_equal(labels, raw)  # the rule removed something
    np.testing.assert_array_equal(segment(model, read_volume(image_path).array, postprocess=False)[0], raw)
