"""Synthetic microCT: determinism, anatomy of the fly, image/label agreement, slab streaming, physics, CLI."""

from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest
from scipy import ndimage, stats

from meunet.errors import InputError
from meunet.io import output_lock, read_volume
from meunet.synth import Acquisition, fly_phantom, generate_dataset, iter_volume, make_phantom, porous_phantom
from meunet.synth.dataset import volume_seeds

FLY = (192, 96, 96)


@pytest.fixture(scope="module")
def flies():
    """Three default-size flies (image, labels) for seeds 0, 1, 2."""
    return [fly_phantom(FLY, seed) for seed in range(3)]


def test_fly_is_deterministic_and_seeds_differ(flies):
    image, labels = fly_phantom(FLY, 0)
    assert np.array_equal(image, flies[0][0])
    assert np.array_equal(labels, flies[0][1])
    assert not np.array_equal(flies[0][1] == 1, flies[1][1] == 1)
    assert not np.array_equal(flies[1][1] == 1, flies[2][1] == 1)


def test_fly_anatomy(flies):
    for image, labels in flies:
        assert image.dtype == np.uint8 and labels.dtype == np.uint8 and image.shape == labels.shape == FLY
        assert set(np.unique(labels)) == {0, 1, 2}
        assert 0.005 < np.mean(labels > 0) < 0.08
        assert ndimage.label(labels == 1)[1] == 1, "the gut is one connected tube"
        assert ndimage.label(labels == 2)[1] == 1, "the crop is one sac with its duct"
        assert ndimage.label(labels > 0)[1] == 1, "the crop joins the gut"


def test_gut_differs_from_the_tissue_around_it_but_not_trivially(flies):
    for image, labels in flies:
        gut = labels == 1
        around = ndimage.binary_dilation(gut, iterations=4) & (labels == 0)
        around &= image > np.percentile(image[gut], 5)  # tissue, not the air outside the body
        inside, outside = image[gut].astype(float), image[around].astype(float)
        assert stats.ks_2samp(inside, outside).pvalue < 1e-6
        # No threshold separates them: much of the surrounding tissue lies in the gut's central range.
        low, high = np.percentile(inside, [10, 90])
        assert np.mean((outside >= low) & (outside <= high)) > 0.3


def test_slabs_equal_the_whole_volume():
    for kind, shape in (("fly", (40, 48, 44)), ("porous", (30, 40, 40))):
        phantom = make_phantom(kind, shape, 5)
        acq = Acquisition()
        whole = next(iter_volume(phantom, acq, depth=shape[0]))
        parts = list(iter_volume(phantom, acq, depth=7))
        assert [z0 for z0, _, _ in parts] == list(range(0, shape[0], 7))
        assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])
        assert np.array_equal(np.concatenate([p[2] for p in parts]), whole[2])


def test_physics_model_on_48_cubed():
    start = time.perf_counter()
    image, labels = fly_phantom((48, 48, 48), 1, physics=True, workers=2)
    seconds = time.perf_counter() - start
    fast, fast_labels = fly_phantom((48, 48, 48), 1)
    assert seconds < 30
    assert np.array_equal(labels, fast_labels)
    assert image.dtype == np.uint8 and image.std() > 5
    # The reconstruction shows the same object in the same place as the image-space model.
    assert np.corrcoef(image.ravel(), fast.ravel())[0, 1] > 0.8
    phantom = make_phantom("fly", (48, 48, 48), 1)
    parts = list(iter_volume(phantom, Acquisition(physics=True), depth=20))
    assert np.array_equal(np.concatenate([p[1] for p in parts]), image)


def test_porous_phantom():
    image, labels = porous_phantom((48, 64, 64), 2, dtype=np.uint16)
    assert image.dtype == np.uint16 and set(np.unique(labels)) == {0, 1, 2}
    y, x = np.ogrid[:64, :64]
    core = np.hypot(y - 31.5, x - 31.5) < 20  # well inside the sample cylinder
    pores = np.mean(labels[:, core] == 0)
    assert 0.2 < pores < 0.4  # target porosity 0.3
    inclusions = labels == 2
    assert image[inclusions].mean() > image[labels == 1].mean() > image[labels == 0].mean()


def test_dataset_files_are_byte_identical_and_match_the_arrays(tmp_path):
    shape = (40, 48, 48)
    runs = [("a", "nii"), ("b", "nii"), ("c", "nii.gz"), ("d", "nii.gz")]
    paths = [generate_dataset(tmp_path / name, "fly", 2, shape, seed=7, fmt=fmt) for name, fmt in runs]
    meta = json.loads(paths[0].read_text())
    assert meta["kind"] == "fly" and meta["classes"] == ["background", "gut", "crop"]
    assert meta["shape"] == list(shape) and meta["format"] == "nii"
    assert meta["parameters"]["acquisition"]["snr"] == Acquisition().snr
    assert [v["seed"] for v in meta["volumes"]] == volume_seeds(7, 2)
    for name in ("dataset.json", "img_000.nii", "lab_000.nii", "img_001.nii", "lab_001.nii"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # .nii.gz: byte-identical too (gzip header without a time stamp), and the same voxels as .nii.
    for name in ("img_000.nii", "lab_001.nii"):
        assert (tmp_path / "c" / f"{name}.gz").read_bytes() == (tmp_path / "d" / f"{name}.gz").read_bytes()
        assert (
            gzip.decompress((tmp_path / "c" / f"{name}.gz").read_bytes())
            == (tmp_path / "a" / name).read_bytes()
        )
    entry = meta["volumes"][1]
    image, labels = fly_phantom(shape, entry["seed"])
    assert np.array_equal(read_volume(tmp_path / "a" / entry["image"]).array, image)
    assert np.array_equal(read_volume(tmp_path / "a" / entry["label"]).array, labels)


def test_cli_synth_zarr_and_errors(cli, tmp_path):
    out = tmp_path / "porous"
    result = cli("synth", "porous", out, "--count", "1", "--shape", "24", "32", "32", "--format", "zarr",
                 "--seed", "3", "--no-progress", "--preview")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert (
        meta["classes"] == ["pore", "matrix", "inclusion"] and meta["volumes"][0]["image"] == "img_000.zarr"
    )
    image, labels = porous_phantom((24, 32, 32), meta["volumes"][0]["seed"])
    assert np.array_equal(read_volume(out / "img_000.zarr").array, image)
    assert np.array_equal(read_volume(out / "lab_000.zarr").array, labels)
    assert (out / "preview.png").stat().st_size > 0

    again = cli("synth", "porous", out, "--count", "1", "--shape", "24", "32", "32", "--no-progress")
    assert again.exit_code == 2 and again.stderr.startswith(f"error: {out}: ")
    for args, message in (
        (("--format", "png"), "unknown format"),
        (("--seed", "-1"), "'--seed': Input should be greater than or equal to 0"),
        (("--seed", str(2**32)), "'--seed': Input should be less than or equal to 4294967295"),
        (("--snr", "inf"), "snr must be positive and finite, got inf"),
    ):
        bad = cli("synth", "fly", tmp_path / "new", "--count", "1", *args, "--no-progress")
        assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr
        assert not (tmp_path / "new").exists()
    forced = cli(
        "synth", "porous", out, "--count", "1", "--shape", "24", "32", "32", "--force", "--no-progress"
    )
    assert forced.exit_code == 0, forced.stderr


def test_a_second_run_into_a_data_set_folder_stops_with_one_line(tmp_path):
    (tmp_path / "flies").mkdir()
    with output_lock(tmp_path / "flies"):  # what a first run holds while it writes
        with pytest.raises(InputError, match="another run is writing this output"):
            generate_dataset(tmp_path / "flies", count=1, shape=(16, 16, 16), progress=False)
    assert list((tmp_path / "flies").iterdir()) == []
