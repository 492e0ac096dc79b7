"""``meunet evaluate`` and the overlay picture."""

import json
import warnings

import numpy as np
from PIL import Image

from meunet.io import Volume, write_volume
from meunet.report import foreground_centre, orthogonal_slices, save_overlay


def _labels(shape=(12, 16, 20)) -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros(shape, np.uint8)
    truth[3:9, 4:12, 5:15] = 1
    truth[5:7, 6:9, 7:10] = 2
    pred = np.roll(truth, 1, axis=2)
    return pred, truth


def test_foreground_centre_and_slices():
    _, truth = _labels()
    truth[0, 0, 7:9] = 1  # x = 7, 8 get one voxel more than x = 5..14
    centre = foreground_centre(truth, slab=5)
    assert centre == (6, 8, 8)  # middle of the tied planes z 3..8 and y 4..11; x 7, 8
    axial, coronal, sagittal = orthogonal_slices(truth, centre, slab=5)
    np.testing.assert_array_equal(axial, truth[6])
    np.testing.assert_array_equal(coronal, truth[:, 8, :])
    np.testing.assert_array_equal(sagittal, truth[:, :, 8])
    assert foreground_centre(np.zeros((4, 6, 8), np.uint8)) == (2, 3, 4)


def test_cli_evaluate_json_overlay(cli, tmp_path):
    pred, truth = _labels()
    spacing = (2.0, 1.0, 0.5)
    write_volume(tmp_path / "pred.nii.gz", Volume(pred, spacing=spacing))
    write_volume(tmp_path / "truth.zarr", Volume(truth, spacing=spacing))
    result = cli(
        "evaluate", tmp_path / "pred.nii.gz", tmp_path / "truth.zarr", "--json", tmp_path / "scores.json",
        "--overlay", tmp_path / "overlay.png", "--class-names", "background,gut,crop",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "gut" in result.stdout and "crop" in result.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    gut = scores["classes"][1]
    assert gut["name"] == "gut" and gut["hd95_mm"] == 0.5  # shifted by one voxel along x (0.5 mm)
    assert gut["volume_mm3_truth"] == ((truth == 1).sum()) * 1.0
    assert scores["classes"][0]["hd95_mm"] is None
    with Image.open(tmp_path / "overlay.png") as png:
        assert png.format == "PNG" and png.size[0] > 200
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # classes drawn


def test_overlay_draws_the_scan_in_grey_under_the_labels(cli, tmp_path):
    pred, truth = _labels()
    image = np.random.default_rng(0).integers(0, 60000, truth.shape).astype(np.uint16)
    for name, array in (("pred.npy", pred), ("truth.npy", truth), ("image.npy", image)):
        np.save(tmp_path / name, array)
    args = ("evaluate", tmp_path / "pred.npy", tmp_path / "truth.npy", "--overlay")
    assert cli(*args, tmp_path / "plain.png").exit_code == 0
    assert cli(*args, tmp_path / "scan.png", "--image", tmp_path / "image.npy").exit_code == 0
    pixels = {}
    for name in ("plain", "scan"):
        with Image.open(tmp_path / f"{name}.png") as png:
            rgb = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
        grey = (rgb[:, 0] == rgb[:, 1]) & (rgb[:, 1] == rgb[:, 2]) & (rgb[:, 0] > 40) & (rgb[:, 0] < 215)
        pixels[name] = grey.sum()
    # Mid-grey pixels: only anti-aliased text without the scan; the noisy scan's background with it.
    assert 20 * pixels["plain"] < pixels["scan"], pixels
    np.save(tmp_path / "image.npy", image[1:])
    result = cli(*args, tmp_path / "bad.png", "--image", tmp_path / "image.npy")
    assert result.exit_code == 2 and "image.npy" in result.stderr and "differs" in result.stderr
    assert not (tmp_path / "bad.png").exists()


def test_cli_evaluate_bad_input(cli, tmp_path):
    pred, truth = _labels()
    np.save(tmp_path / "pred.npy", pred[:-1])
    np.save(tmp_path / "truth.npy", truth)
    result = cli("evaluate", tmp_path / "pred.npy", tmp_path / "truth.npy")
    assert result.exit_code == 2 and "differs" in result.stderr and result.stderr.count("\n") == 1
    np.save(tmp_path / "pred.npy", np.minimum(pred, 1))
    result = cli("evaluate", tmp_path / "pred.npy", tmp_path / "truth.npy", "--class-names", "background,gut")
    assert (
        result.exit_code == 2 and str(tmp_path / "truth.npy") in result.stderr and "[0, 2)" in result.stderr
    )
    assert "(--class-names names 2 classes)" in result.stderr
    scan = np.random.default_rng(0).integers(0, 200, truth.shape).astype(np.uint8)  # the image, not labels
    np.save(tmp_path / "scan.npy", scan)
    result = cli("evaluate", tmp_path / "scan.npy", tmp_path / "truth.npy", "--json", tmp_path / "s.json")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"error: {tmp_path / 'scan.npy'}: label value {scan.max()} is above the truth's largest "
        f"({truth.max()}): is it a label map? (--class-names gives the classes where the truth lacks some)"
    ]
    assert not (tmp_path / "s.json").exists()


def test_evaluate_outputs_named_for_another_format_or_a_users_folder_are_refused(cli, tmp_path):
    """``--json results`` (a folder meant) would write a file ``results``; ``--overlay ov.jpg`` PNG bytes in
    a .jpg; ``--json`` onto a folder of the user's, even with ``--force``, would delete it."""
    pred, truth = _labels()
    np.save(tmp_path / "pred.npy", pred)
    np.save(tmp_path / "truth.npy", truth)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.txt").write_text("mine")
    args = ("evaluate", tmp_path / "pred.npy", tmp_path / "truth.npy", "--force")
    cases = {
        ("--json", "results"): "results: holds keep.txt, which meunet did not write",
        ("--json", "new"): "new: --json writes JSON: give a name ending in .json",
        ("--overlay", "ov.jpg"): "ov.jpg: the overlay is a PNG: give a name ending in .png",
    }
    for (option, name), message in cases.items():
        result = cli(*args, option, tmp_path / name)
        assert result.exit_code == 2 and result.stderr.startswith(f"error: {tmp_path}/{message}")
        assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.npy", "results", "truth.npy"]
    assert (tmp_path / "results" / "keep.txt").read_text() == "mine"


def test_an_overlay_of_a_scan_with_non_finite_voxels_draws_them_without_warnings(tmp_path):
    pred, truth = _labels()
    image = np.random.default_rng(0).random(truth.shape, dtype=np.float32)
    z, y, x = foreground_centre(truth)
    image[z, y, x : x + 3] = [np.inf, -np.inf, np.nan]  # on all three planes drawn
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value" warnings were several lines on stderr
        save_overlay(pred, truth, tmp_path / "ov.png", image=image)
    assert (tmp_path / "ov.png").stat().st_size > 0
