"""``meunet info`` and ``meunet convert``, bad input ending in one line and exit status 2, and real scans."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from meunet.errors import InputError
from meunet.io import Volume, open_volume, read_volume, write_volume

RNG = np.random.default_rng(1)


def _assert_one_line_error(result, path) -> None:
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert result.stdout == ""


def _only(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def volume_path(tmp_path):
    array = RNG.integers(-50, 300, size=(6, 7, 8)).astype(np.int16)
    path = tmp_path / "in.nii.gz"
    write_volume(path, Volume(array, spacing=(2.0, 0.5, 0.25), origin=(1.0, 2.0, 3.0)))
    return path


def test_info_json(cli, volume_path):
    result = cli("info", volume_path, "--json")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    array = read_volume(volume_path).array
    assert list(facts) == [
        "path",
        "format",
        "shape",
        "dtype",
        "spacing",
        "origin",
        "direction",
        "nbytes",
        "min",
        "max",
        "non_finite",
    ]
    assert facts["format"] == "nifti-gz"
    assert facts["shape"] == [6, 7, 8] and facts["dtype"] == "int16"
    assert facts["spacing"] == [2.0, 0.5, 0.25] and facts["origin"] == [1.0, 2.0, 3.0]
    assert facts["direction"] == np.eye(3).tolist()
    assert facts["nbytes"] == array.nbytes
    assert (facts["min"], facts["max"]) == (int(array.min()), int(array.max()))
    assert facts["non_finite"] == 0


def test_info_ranges_finite_voxels_and_counts_the_others_in_strict_json(cli, tmp_path):
    array = np.ones((4, 4, 4), np.float32)
    array[0, 0, :3] = (np.nan, np.inf, -2.0)
    np.save(tmp_path / "a.npy", array)
    result = cli("info", tmp_path / "a.npy", "--json")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert (facts["min"], facts["max"], facts["non_finite"]) == (-2.0, 1.0, 2)
    np.save(tmp_path / "b.npy", np.full((2, 2, 2), np.nan, np.float32))
    facts = json.loads(cli("info", tmp_path / "b.npy", "--json").stdout, parse_constant=pytest.fail)
    assert (facts["min"], facts["max"], facts["non_finite"]) == (None, None, 8)
    table = cli("info", tmp_path / "a.npy").stdout
    assert "-2 .. 1 (2 voxels NaN or infinite" in table


def test_info_table_and_spacing_override(cli, volume_path):
    result = cli("info", volume_path, "--spacing", "1", "2", "3")
    assert result.exit_code == 0, result.stderr
    assert "6 x 7 x 8 (z, y, x)" in result.stdout
    assert "1 x 2 x 3 mm" in result.stdout
    assert "int16" in result.stdout


def test_convert_keeps_voxels_and_geometry_and_sets_chunks(cli, volume_path, tmp_path):
    result = cli("convert", volume_path, tmp_path / "out.zarr", "--chunks", "2", "7", "4")
    assert result.exit_code == 0, result.stderr
    out = open_volume(tmp_path / "out.zarr")
    src = read_volume(volume_path)
    assert out.array.chunks == (2, 7, 4)
    np.testing.assert_array_equal(out.array[...], src.array)
    assert (out.spacing, out.origin) == (src.spacing, src.origin)
    result = cli("convert", tmp_path / "out.zarr", tmp_path / "out.tif", "--spacing", "0.5", "0.5", "0.5")
    assert result.exit_code == 0, result.stderr
    assert open_volume(tmp_path / "out.tif").spacing == (0.5, 0.5, 0.5)
    assert _only(tmp_path) == ["in.nii.gz", "out.tif", "out.zarr"]


def test_output_that_exists_needs_force(cli, volume_path, tmp_path):
    out = tmp_path / "out.npy"
    out.write_bytes(b"mine")
    _assert_one_line_error(cli("convert", volume_path, out), out)
    assert out.read_bytes() == b"mine"
    assert cli("convert", volume_path, out, "--force").exit_code == 0
    np.testing.assert_array_equal(read_volume(out).array, read_volume(volume_path).array)
    assert _only(tmp_path) == ["in.nii.gz", "out.npy"]


def test_missing_file(cli, tmp_path):
    _assert_one_line_error(cli("info", tmp_path / "nothere.nii"), tmp_path / "nothere.nii")
    _assert_one_line_error(
        cli("convert", tmp_path / "nothere.tif", tmp_path / "o.nii"), tmp_path / "nothere.tif"
    )
    assert _only(tmp_path) == []


def test_a_folder_without_a_volume_is_one_line_without_itk_warnings(tmp_path):
    """GDCM writes its warnings straight to the process's stderr: run the command in a process of its own."""
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "meunet", "info", tmp_path / "empty"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"error: {tmp_path / 'empty'}: the folder holds no TIFF slices, DICOM series or Zarr store\n"
    )


@pytest.mark.parametrize(("name", "compress"), [("cut.mha", False), ("cut.mha", True), ("cut.mhd", False)])
def test_a_cut_metaimage_is_one_line_without_itk_text(tmp_path, name, compress):
    """MetaIO prints its findings straight to stderr: run the command in a process of its own."""
    path = tmp_path / name
    write_volume(path, Volume(RNG.random((16, 24, 24), dtype=np.float32)))
    if compress:  # meunet writes MetaImages uncompressed; ITK compresses when asked
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path), True)
    data = path.with_suffix(".raw") if name.endswith(".mhd") else path
    data.write_bytes(data.read_bytes()[: data.stat().st_size - 4000])
    args = [sys.executable, "-m", "meunet", "convert", path, tmp_path / "out.nii.gz"]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {data}: truncated MetaImage data: ") and (
        result.stderr.count("\n") == 1
    ), result.stderr
    assert not (tmp_path / "out.nii.gz").exists()


def test_unknown_extension(cli, volume_path, tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"\0" * 100)
    _assert_one_line_error(cli("info", tmp_path / "scan.xyz"), tmp_path / "scan.xyz")
    _assert_one_line_error(cli("convert", volume_path, tmp_path / "out.xyz"), tmp_path / "out.xyz")
    (tmp_path / "file.zarr").write_bytes(b"\0" * 100)
    _assert_one_line_error(cli("info", tmp_path / "file.zarr"), tmp_path / "file.zarr")
    assert _only(tmp_path) == ["file.zarr", "in.nii.gz", "scan.xyz"]


def test_nii_gz_cut_in_half(cli, tmp_path):
    path = tmp_path / "half.nii.gz"
    write_volume(path, Volume(RNG.integers(0, 255, size=(40, 50, 60), dtype=np.uint8)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(cli("info", path), path)
    _assert_one_line_error(cli("convert", path, tmp_path / "out.nii"), path)
    assert _only(tmp_path) == ["half.nii.gz"]


def test_uncompressed_nifti_cut_short(cli, tmp_path):
    path = tmp_path / "short.nii"
    write_volume(path, Volume(np.zeros((4, 5, 6), np.uint8)))
    path.write_bytes(path.read_bytes()[:-10])
    _assert_one_line_error(cli("info", path), path)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_cut_in_half(cli, tmp_path, compression):
    path = tmp_path / "half.tif"
    tifffile.imwrite(path, RNG.integers(0, 255, size=(20, 64, 64), dtype=np.uint8), compression=compression)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_one_line_error(cli("info", path), path)


def test_tiff_of_garbage_bytes(cli, tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(RNG.integers(0, 255, size=5000, dtype=np.uint8).tobytes())
    _assert_one_line_error(cli("info", path), path)
    _assert_one_line_error(cli("convert", path, tmp_path / "out.zarr"), path)
    assert _only(tmp_path) == ["garbage.tif"]


def test_2d_and_4d_arrays_are_not_volumes(cli, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 6), np.uint8))
    _assert_one_line_error(cli("info", tmp_path / "flat.npy"), tmp_path / "flat.npy")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.uint8), np.eye(4)), tmp_path / "time.nii")
    _assert_one_line_error(cli("info", tmp_path / "time.nii"), tmp_path / "time.nii")
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((5, 6), np.uint8))
    _assert_one_line_error(cli("convert", tmp_path / "one.tif", tmp_path / "o.nii"), tmp_path / "one.tif")
    assert _only(tmp_path) == ["flat.npy", "one.tif", "time.nii"]


def test_slice_folder_with_mismatched_slices(cli, tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(folder / f"s{z}.tif", np.zeros((4, 5 if z != 1 else 6), np.uint8))
    result = cli("info", folder)
    _assert_one_line_error(result, folder)
    assert "s1.tif" in result.stderr


def test_slice_folder_with_a_damaged_slice_names_it(cli, tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(folder / f"s{z}.tif", np.zeros((4, 5), np.uint8))
    (folder / "s3.tif").write_bytes(b"II*\x00" + bytes(4))  # a TIFF header pointing at no image
    for command in (("info", folder), ("convert", folder, tmp_path / "out.nii.gz")):
        _assert_one_line_error(cli(*command), folder / "s3.tif")
    assert _only(tmp_path) == ["slices"]
    (folder / "s3.tif").unlink()  # and a slice damaged after the folder was opened:
    opened = open_volume(folder)
    (folder / "s1.tif").write_bytes(b"not a tiff any more")
    with pytest.raises(InputError, match=r"s1\.tif: not a readable TIFF file"):
        opened.array[0:3]


def test_int64_voxels_are_refused_by_tiff_and_kept_by_formats_that_hold_them(cli, tmp_path):
    array = np.arange(64, dtype=np.int64).reshape(4, 4, 4) * 2**40
    np.save(tmp_path / "big.npy", array)
    for out in ("out.tif", "out_slices"):
        result = cli("convert", tmp_path / "big.npy", tmp_path / out)
        _assert_one_line_error(result, tmp_path / out)
        assert "cannot hold int64 voxels: use .zarr or .npy" in result.stderr
    assert _only(tmp_path) == ["big.npy"]
    assert cli("convert", tmp_path / "big.npy", tmp_path / "out.zarr").exit_code == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "out.zarr").array, array)


def test_folder_without_a_volume(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    _assert_one_line_error(cli("info", tmp_path), tmp_path)


# -- real scans (../shared/data/real) ------------------------------------------------------------------------
def test_real_fly_info(cli, real_data):
    path = real_data / "qim3d" / "fly_150x256x256.tif"
    result = cli("info", path, "--json")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["shape"] == [150, 256, 256] and facts["dtype"] == "uint8"
    array = tifffile.imread(path)
    assert (facts["min"], facts["max"]) == (int(array.min()), int(array.max()))


def test_real_fly_survives_a_chain_of_conversions(cli, real_data, tmp_path):
    src = real_data / "qim3d" / "fly_150x256x256.tif"
    chain = [src, tmp_path / "fly.nii.gz", tmp_path / "fly.zarr", tmp_path / "fly.nrrd", tmp_path / "fly.tif"]
    for a, b in itertools.pairwise(chain):
        result = cli("convert", a, b)
        assert result.exit_code == 0, result.stderr
    back = tifffile.imread(chain[-1])
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, tifffile.imread(src))


def test_real_ct_keeps_spacing_origin_direction_through_zarr(cli, real_data, tmp_path):
    src = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    assert cli("convert", src, tmp_path / "ct.zarr").exit_code == 0
    assert cli("convert", tmp_path / "ct.zarr", tmp_path / "ct.nii.gz").exit_code == 0
    before, after = nib.load(src), nib.load(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(after.affine, before.affine)
    np.testing.assert_array_equal(after.header.get_zooms(), (3.0, 3.0, 3.0))
    assert after.get_data_dtype() == before.get_data_dtype()
    np.testing.assert_array_equal(np.asarray(after.dataobj), np.asarray(before.dataobj))
