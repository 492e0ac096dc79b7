"""meunet.io: round trips of every format, lazy slab reads, streaming writers, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from meunet.errors import InputError
from meunet.io import Volume, create_writer, open_volume, read_volume, volume_format, write_volume

RNG = np.random.default_rng(0)
ROTATION = np.linalg.qr(RNG.normal(size=(3, 3)))[0]
# what each format holds: (format name, dtypes to try, keeps origin+direction, keeps spacing)
FORMATS = {
    "a.nii": ("nifti", True, True),
    "a.nii.gz": ("nifti-gz", True, True),
    "a.tif": ("tiff", False, True),
    "slices": ("tiff-slices", False, True),
    "a.zarr": ("ome-zarr", True, True),
    "a.nrrd": ("nrrd", True, True),
    "a.mha": ("metaimage", True, True),
    "a.mhd": ("metaimage", True, True),
    "a.npy": ("npy", False, False),
}


def _volume(dtype) -> Volume:
    array = RNG.integers(0, 120, size=(7, 9, 11)).astype(dtype)
    return Volume(array, spacing=(0.5, 0.25, 0.125), origin=(10.0, -20.5, 30.25), direction=ROTATION)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_round_trip_keeps_voxels_dtype_and_geometry(tmp_path, name, dtype):
    fmt, keeps_pose, keeps_spacing = FORMATS[name]
    volume = _volume(dtype)
    path = tmp_path / name
    write_volume(path, volume)
    assert volume_format(path) == fmt
    back = read_volume(path)
    assert isinstance(back.array, np.ndarray)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, volume.array)
    # NIfTI stores geometry as float32, TIFF resolution as a rational: compare at float32 precision
    if keeps_spacing:
        np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
    else:
        assert back.spacing == (1.0, 1.0, 1.0)
    if keeps_pose:
        np.testing.assert_allclose(back.origin, volume.origin, rtol=1e-6)
        np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {name, "a.raw"} if name == "a.mhd" else {name}
    )


def test_writer_streams_slabs_in_any_order(tmp_path):
    volume = _volume("uint8")
    for name in ("a.nii", "a.tif", "a.zarr", "a.npy"):
        with create_writer(tmp_path / name, volume.array.shape, np.uint8, like=volume) as writer:
            for z0 in (4, 0, 2):
                writer.write(z0, volume.array[z0 : z0 + (3 if z0 == 4 else 2)])
            assert writer.is_written(0, 7)
        np.testing.assert_array_equal(
            open_volume(tmp_path / name).array[2:5, 1:3, ::2], volume.array[2:5, 1:3, ::2]
        )


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), create_writer(tmp_path / "a.nii.gz", (4, 5, 6), np.uint8) as writer:
        writer.write(0, np.zeros((2, 5, 6), np.uint8))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"mine")
    with pytest.raises(InputError, match="exists"):
        create_writer(tmp_path / "a.npy", (2, 2, 2), np.uint8)
    write_volume(tmp_path / "a.npy", _volume("uint8"), force=True)
    assert read_volume(tmp_path / "a.npy").array.shape == (7, 9, 11)
