"""meunet.io: round trips of every format, lazy slab reads, streaming and resumable writers, interop."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from meunet.errors import InputError
from meunet.io import (
    Volume,
    create_writer,
    open_volume,
    read_volume,
    value_range,
    volume_format,
    write_volume,
)

RNG = np.random.default_rng(0)
ROTATION = np.linalg.qr(RNG.normal(size=(3, 3)))[0]
# output name -> (format read back, keeps origin and direction, keeps spacing)
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


def _volume(dtype, shape=(7, 9, 11)) -> Volume:
    array = RNG.integers(0, 120, size=shape).astype(dtype)
    return Volume(array, spacing=(0.5, 0.25, 0.125), origin=(10.0, -20.5, 30.25), direction=ROTATION)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32", "float64", "int32"])
def test_round_trip_keeps_voxels_dtype_and_geometry(tmp_path, name, dtype):
    fmt, keeps_pose, keeps_spacing = FORMATS[name]
    volume = _volume(dtype, (3, 9, 11))  # 3 slices: TIFF must not take them for RGB planes
    path = tmp_path / name
    write_volume(path, volume)
    assert volume_format(path) == fmt
    back = read_volume(path)
    assert isinstance(back.array, np.ndarray)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, volume.array)
    # NIfTI stores geometry as float32 and TIFF resolution as a rational: compare at float32 precision
    if keeps_spacing:
        np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
    else:
        assert back.spacing == (1.0, 1.0, 1.0)
    if keeps_pose:
        np.testing.assert_allclose(back.origin, volume.origin, rtol=1e-6)
        np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    else:
        assert back.origin == (0.0, 0.0, 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {name, "a.raw"} if name == "a.mhd" else {name}
    )


def test_geometry_matches_itk_world_coordinates(tmp_path):
    """Voxel (i, j, k) of our volume lies where ITK puts the same voxel, for NIfTI read by both libraries."""
    volume = _volume("int16")
    write_volume(tmp_path / "a.nii", volume)
    image = sitk.ReadImage(str(tmp_path / "a.nii"))
    back = open_volume(tmp_path / "a.nii")
    for index in [(0, 0, 0), (6, 2, 5), (3, 8, 10)]:
        ours = np.asarray(back.origin) + back.direction @ (np.asarray(back.spacing) * index)
        itk = image.TransformIndexToPhysicalPoint(index[::-1])
        np.testing.assert_allclose(ours[::-1], itk, atol=1e-4)
        assert back.array[index] == image[index[::-1]]


def test_lazy_array_slicing_matches_numpy(tmp_path):
    volume = _volume("uint16")
    keys = [
        np.s_[2:5],
        np.s_[-1],
        np.s_[1:6:2, 7:1:-2, 3],
        np.s_[..., 4],
        np.s_[3, 2, 1],
        np.s_[5:2],
        np.s_[:, 1:2],
        np.s_[2, 3:5, 4],
        np.s_[6:0:-3, 3:5],  # zarr arrays (returned as they are) take no negative steps
    ]
    for name in ("a.nii.gz", "a.tif", "a.npy", "slices", "a.mha", "a.zarr"):
        write_volume(tmp_path / name, volume)
        lazy = open_volume(tmp_path / name).array
        assert not isinstance(lazy, np.ndarray)
        assert (lazy.shape, lazy.dtype, lazy.ndim) == (volume.array.shape, volume.array.dtype, 3)
        for key in [k for k in keys if "-" not in str(k)] if name == "a.zarr" else keys:
            got = lazy[key]
            assert isinstance(got, np.ndarray) and got.flags.c_contiguous
            np.testing.assert_array_equal(got, volume.array[key])


BIG = (512, 128, 128)  # 8 MiB of uint8, far larger than the slabs below


@pytest.mark.parametrize("name", ["a.zarr", "a.npy", "a.nii", "a.tif", "slices", "a.mha"])
def test_reading_a_slab_does_not_load_the_volume(tmp_path, name):
    array = RNG.integers(0, 255, size=BIG, dtype=np.uint8)
    write_volume(tmp_path / name, Volume(array), chunks=(8, 128, 128))
    volume = open_volume(tmp_path / name)
    tracemalloc.start()
    slab = volume.array[100:102]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(slab, array[100:102])
    assert peak < array.nbytes / 16, f"reading 2 of {BIG[0]} slices allocated {peak} bytes"


def test_tracemalloc_sees_a_whole_read(tmp_path):
    """The measure used above does catch a whole-volume read."""
    array = RNG.integers(0, 255, size=BIG, dtype=np.uint8)
    write_volume(tmp_path / "a.npy", Volume(array))
    tracemalloc.start()
    read_volume(tmp_path / "a.npy")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak >= array.nbytes


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "a.tif", "a.zarr", "a.npy"])
def test_writer_memory_stays_near_one_slab(tmp_path, name):
    shape = (1024, 128, 128)  # 16 MiB
    slab = RNG.integers(0, 255, size=(8, *shape[1:]), dtype=np.uint8)
    tracemalloc.start()
    with create_writer(tmp_path / name, shape, np.uint8, chunks=(8, 64, 64)) as writer:
        for z0 in range(0, shape[0], 8):
            writer.write(z0, slab)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < np.prod(shape) / 8, f"writing 8-slice slabs of a {shape} volume allocated {peak} bytes"
    np.testing.assert_array_equal(open_volume(tmp_path / name).array[-8:], slab)


def test_writer_takes_slabs_in_any_order(tmp_path):
    volume = _volume("uint8")
    for name in ("a.nii", "a.tif", "a.zarr", "a.npy", "a.nrrd", "slices"):
        with create_writer(tmp_path / name, volume.array.shape, np.uint8, like=volume) as writer:
            for z0, z1 in [(4, 7), (0, 2), (2, 4)]:
                assert not writer.is_written(z0, z1)
                writer.write(z0, volume.array[z0:z1])
            assert writer.is_written(0, 7)
        np.testing.assert_array_equal(read_volume(tmp_path / name).array, volume.array)


def test_writer_rejects_slabs_that_do_not_fit(tmp_path):
    with create_writer(tmp_path / "a.npy", (4, 5, 6), np.uint8) as writer:
        with pytest.raises(ValueError, match="does not fit"):
            writer.write(3, np.zeros((2, 5, 6), np.uint8))
        with pytest.raises(ValueError, match="does not fit"):
            writer.write(0, np.zeros((1, 5, 7), np.uint8))
        with pytest.raises(TypeError, match="cast"):
            writer.write(0, np.zeros((1, 5, 6), np.float32))
        writer.write(0, np.zeros((4, 5, 6), bool))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), create_writer(tmp_path / "a.nii.gz", (4, 5, 6), np.uint8) as writer:
        writer.write(0, np.zeros((2, 5, 6), np.uint8))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"mine")
    with pytest.raises(InputError, match="exists"):
        create_writer(tmp_path / "a.npy", (2, 2, 2), np.uint8)
    assert (tmp_path / "a.npy").read_bytes() == b"mine"
    write_volume(tmp_path / "a.npy", _volume("uint8"), force=True)
    assert read_volume(tmp_path / "a.npy").array.shape == (7, 9, 11)
    write_volume(tmp_path / "a.zarr", _volume("uint8"))
    write_volume(tmp_path / "a.zarr", _volume("int16", (3, 4, 5)), force=True)
    assert read_volume(tmp_path / "a.zarr").array.shape == (3, 4, 5)
    (tmp_path / "b.zarr").write_bytes(b"a file in the way of a folder")
    write_volume(tmp_path / "b.zarr", _volume("uint8"), force=True)
    assert read_volume(tmp_path / "b.zarr").array.shape == (7, 9, 11)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.zarr", "b.zarr"]


@pytest.mark.parametrize("name", ["a.zarr", "a.nii.gz", "a.tif"])
def test_resume_continues_a_killed_write(tmp_path, name):
    volume = _volume("uint8", (12, 9, 11))
    shape = volume.array.shape
    first = create_writer(tmp_path / name, shape, np.uint8, like=volume, resume=True)
    with pytest.raises(KeyboardInterrupt), first as w:
        w.write(0, volume.array[0:4])
        w.write(8, volume.array[8:12])
        raise KeyboardInterrupt
    assert not (tmp_path / name).exists()
    for changed in [
        {"shape": (12, 9, 12)},
        {"dtype": np.int16},
        {"like": Volume(volume.array, spacing=(1, 1, 1))},
    ]:
        args = {"shape": shape, "dtype": np.uint8, "like": volume, **changed}
        with (
            pytest.raises(InputError, match="earlier run"),
            create_writer(tmp_path / name, **args, resume=True),
        ):
            pass
    with create_writer(tmp_path / name, shape, np.uint8, like=volume, resume=True) as writer:
        assert writer.is_written(0, 4) and writer.is_written(8, 12)
        assert not writer.is_written(3, 5)
        writer.write(4, volume.array[4:8])
    back = read_volume(tmp_path / name)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def _damage(partial, name: str, volume: Volume) -> None:
    """Spoil slices 4..8 of a partial output as a killed run or a failing disk would."""
    if name.endswith(".zarr"):
        chunk = partial / name / "0" / "c" / "1" / "0" / "0"  # z chunk 1 of (4, 9, 11) chunks
        chunk.write_bytes(chunk.read_bytes()[:5])  # cut short
    elif name.endswith(".npy"):
        array = np.load(partial / name, mmap_mode="r+")
        array[5] = 255 - volume.array[5]  # flipped bits, same length
        array.flush()
    else:
        (partial / name / "slice_00006.tif").unlink()


@pytest.mark.parametrize("name", ["a.zarr", "a.npy", "slices"])
def test_resume_keeps_only_slabs_that_read_back_and_refuses_another_run(tmp_path, name):
    volume = _volume("uint8", (12, 9, 11))
    shape = volume.array.shape
    args = {"like": volume, "chunks": (4, 9, 11), "resume": True}
    first = create_writer(tmp_path / name, shape, np.uint8, **args, run={"model": "A"})
    with pytest.raises(KeyboardInterrupt), first as w:
        for z0 in (0, 4, 8):
            w.write(z0, volume.array[z0 : z0 + 4])
        raise KeyboardInterrupt
    with (
        pytest.raises(InputError, match="made by another model, input or settings"),
        create_writer(tmp_path / name, shape, np.uint8, **args, run={"model": "B"}),
    ):
        pass
    partial = tmp_path / f".{name}.partial"
    _damage(partial, name, volume)
    with open(partial / "progress.jsonl", "a") as log:
        log.write("[8, 1")  # a line torn by the kill
    with create_writer(tmp_path / name, shape, np.uint8, **args, run={"model": "A"}) as writer:
        assert writer.is_written(0, 4) and writer.is_written(8, 12)
        assert not writer.is_written(4, 5) and not writer.is_written(7, 8)
        writer.write(4, volume.array[4:8])
    np.testing.assert_array_equal(read_volume(tmp_path / name).array, volume.array)


def test_resume_needs_a_random_access_format(tmp_path):
    with pytest.raises(InputError, match="resuming"):
        create_writer(tmp_path / "a.nrrd", (2, 2, 2), np.uint8, resume=True)


def test_zarr_writer_exposes_array_and_chunks(tmp_path):
    assert create_writer(tmp_path / "a.zarr", (20, 30, 40), np.uint8).z_chunk == 20  # default 64, clipped
    with create_writer(tmp_path / "a.zarr", (20, 30, 40), np.uint8, chunks=(5, 30, 40)) as writer:
        assert writer.z_chunk == 5
        writer.array[0:20] = 7
    back = open_volume(tmp_path / "a.zarr")
    assert back.array.chunks == (5, 30, 40)
    assert value_range(back.array) == (7, 7, 0)


def test_our_ome_zarr_is_readable_by_ome_zarr(tmp_path):
    pytest.importorskip("ome_zarr", reason="ome-zarr (the napari plugin's reader) is not installed")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    volume = _volume("uint8", (16, 16, 16))
    write_volume(tmp_path / "ours.zarr", volume)
    node = next(iter(Reader(parse_url(tmp_path / "ours.zarr"))()))
    np.testing.assert_array_equal(np.asarray(node.data[0]), volume.array)
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == list(volume.spacing)


def test_reads_level_0_of_an_ngff_04_pyramid_with_a_channel_axis(tmp_path):
    import zarr

    volume = _volume("uint16", (16, 16, 16))
    root = zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=2)
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0] + [s * 2**level for s in (2.0, 3.0, 4.0)]},
                {"type": "translation", "translation": [0.0, 5.0, 6.0, 7.0]},
            ],
        }
        for level in range(2)
    ]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    root.create_array("0", data=volume.array[None])
    root.create_array("1", data=volume.array[None, ::2, ::2, ::2])
    theirs = open_volume(tmp_path / "theirs.zarr")
    assert volume_format(tmp_path / "theirs.zarr") == "ome-zarr"
    np.testing.assert_array_equal(theirs.array[...], volume.array)
    np.testing.assert_array_equal(theirs.array[3:5, 2], volume.array[3:5, 2])
    np.testing.assert_allclose(theirs.spacing, (0.002, 0.003, 0.004))
    np.testing.assert_allclose(theirs.origin, (0.005, 0.006, 0.007))


def test_dicom_series_folder(tmp_path):
    volume = _volume("int16", (5, 6, 7))
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing((0.7, 0.6, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(k),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"im{k}.dcm"))
        writer.Execute(piece)
    assert volume_format(tmp_path) == "dicom"
    back = read_volume(tmp_path)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, (2.5, 0.6, 0.7))
    np.testing.assert_allclose(back.origin, (5.0, 20.0, -10.0))
    np.testing.assert_allclose(back.direction, np.eye(3))


def test_tiff_spacing_from_ome_and_user(tmp_path):
    import tifffile

    array = RNG.integers(0, 9, size=(3, 5, 6), dtype=np.uint8)  # few slices: stored as pages, not RGB
    meta = {
        "axes": "ZYX",
        "PhysicalSizeX": 4.0,
        "PhysicalSizeY": 3.0,
        "PhysicalSizeZ": 2.0,
    }  # default unit µm
    tifffile.imwrite(tmp_path / "a.ome.tif", array, ome=True, metadata=meta, photometric="minisblack")
    np.testing.assert_allclose(open_volume(tmp_path / "a.ome.tif").spacing, (0.002, 0.003, 0.004))
    tifffile.imwrite(tmp_path / "plain.tif", array, photometric="minisblack")
    assert open_volume(tmp_path / "plain.tif").spacing == (1.0, 1.0, 1.0)
    assert open_volume(tmp_path / "plain.tif", spacing=(3, 2, 1)).spacing == (3.0, 2.0, 1.0)
    tifffile.imwrite(
        tmp_path / "ij.tif", array, imagej=True, resolution=(1 / 7.0, 1 / 7.0), metadata={"unit": "um"}
    )
    np.testing.assert_allclose(open_volume(tmp_path / "ij.tif").spacing, (0.007, 0.007, 0.007))  # isotropic z


def test_slice_folder_is_read_in_natural_order(tmp_path):
    import tifffile

    for z in (10, 9, 1, 2):
        tifffile.imwrite(tmp_path / f"s{z}.tif", np.full((3, 4), z, np.uint8))
    assert [int(s[0, 0]) for s in read_volume(tmp_path).array] == [1, 2, 9, 10]


def test_nifti_reads_scaled_data_as_float32_and_drops_trailing_singletons(tmp_path):
    import nibabel as nib

    data = RNG.integers(0, 100, size=(5, 4, 3, 1)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "a.nii")
    back = read_volume(tmp_path / "a.nii")
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, data[..., 0].T * 0.5 - 3.0)


def test_float16_where_the_format_holds_it_and_bool_as_uint8(tmp_path):
    half = RNG.random((3, 4, 5)).astype(np.float16)
    for name in ("a.zarr", "a.npy"):
        write_volume(tmp_path / name, Volume(half))
        back = read_volume(tmp_path / name).array
        assert back.dtype == np.float16
        np.testing.assert_array_equal(back, half)
    for name in ("b.nii", "b.tif", "b.nrrd", "slices"):
        with pytest.raises(InputError, match="cannot hold float16"):
            write_volume(tmp_path / name, Volume(half))
    write_volume(tmp_path / "mask.nii.gz", Volume(half > 0.5))
    back = read_volume(tmp_path / "mask.nii.gz").array
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, half > 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.zarr", "mask.nii.gz"]


@pytest.mark.parametrize("bad", [1e39, float("inf"), float("nan")])
def test_open_volume_refuses_spacing_that_is_not_finite_float32(tmp_path, bad):
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(InputError, match="positive finite values"):
        open_volume(tmp_path / "a.npy", (1.0, bad, 1.0))


@pytest.mark.parametrize("name", ["c.npy", "c.nii.gz", "c.tif", "c.zarr"])
def test_complex_voxels_are_refused_in_one_line(tmp_path, name):
    import nibabel as nib
    import tifffile
    import zarr

    array, path = np.zeros((8, 8, 8), np.complex64), tmp_path / name
    if name.endswith(".npy"):
        np.save(path, array)
    elif name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    elif name.endswith(".tif"):
        tifffile.imwrite(path, array)
    else:
        zarr.save_array(str(path), array)
    with pytest.raises(InputError) as info:
        open_volume(path)
    assert (
        str(info.value)
        == f"{path}: unsupported voxel type complex64: meunet reads bool, integer or float voxels"
    )


def test_a_non_finite_origin_is_one_line_naming_the_file(tmp_path):
    import nibabel

    from meunet.errors import InputError

    affine = np.eye(4)
    affine[0, 3] = np.nan
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6), np.uint8), affine), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan\.nii\.gz: origin .* is not finite"):
        open_volume(tmp_path / "nan.nii.gz")


@pytest.mark.parametrize("spacing_z", [0, -2])
def test_a_tiff_without_positive_spacing_is_refused_unless_the_user_gives_one(tmp_path, spacing_z):
    from meunet.errors import InputError

    path = tmp_path / "flat.tif"
    metadata = {"axes": "ZYX", "spacing": spacing_z, "unit": "mm"}
    tifffile.imwrite(path, np.zeros((4, 8, 8), np.uint8), imagej=True, resolution=(1, 1), metadata=metadata)
    with pytest.raises(InputError, match=rf"flat\.tif: voxel spacing {spacing_z} x 1 x 1 mm .* --spacing"):
        open_volume(path)
    assert open_volume(path, spacing=(2.0, 1.0, 1.0)).spacing == (2.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("matrix", "spacing", "message"),
    [
        ("1 0 0 1 0 0 0 0 1", "1 1 1", r"direction matrix 1 0 0; 0 0 0; 0 1 1 is singular"),
        ("1 0 0 0 1 0 0 0 1", "0 1 1", r"voxel spacing 1 x 1 x 0 mm .* correct ElementSpacing"),
    ],
)
def test_a_metaimage_header_itk_cannot_read_is_one_line_naming_the_fault(tmp_path, matrix, spacing, message):
    from meunet.errors import InputError

    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = False\nTransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = {spacing}\n"
        "DimSize = 8 8 4\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    (tmp_path / "bad.mha").write_bytes(header.encode() + bytes(8 * 8 * 4))
    with pytest.raises(InputError, match=rf"bad\.mha: {message}"):
        open_volume(tmp_path / "bad.mha")


@pytest.mark.parametrize(
    ("attrs", "make", "message"),
    [
        ({"multiscales": [{"datasets": [{"path": "nope"}]}]}, None, "KeyError: 'nope'"),
        ({"multiscales": [{"datasets": []}]}, None, "IndexError"),
        ({"multiscales": [{"datasets": [{"path": "s"}], "axes": ["z", "y", "x"]}]}, "group",
         "is not an array"),
        ({"multiscales": [{"datasets": [{"path": "0", "coordinateTransformations": "x"}], "axes": 5}]},
         "array", "TypeError"),
    ],
)  # fmt: skip
def test_malformed_ome_zarr_metadata_is_one_line(tmp_path, attrs, make, message):
    import zarr

    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="w")
    if make == "group":
        group.create_group("s")
    elif make == "array":
        group.create_array("0", shape=(4, 8, 8), dtype="u1")
    group.attrs.update(attrs)
    with pytest.raises(InputError, match=f"m.zarr: malformed OME-Zarr multiscales metadata \\(.*{message}"):
        open_volume(tmp_path / "m.zarr")


def test_a_volume_without_voxels_is_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 32, 32), np.uint8))
    with pytest.raises(InputError, match=r"empty.npy: holds no voxels: shape \(0, 32, 32\)"):
        open_volume(tmp_path / "empty.npy")


def test_float64_voxels_beyond_float32_are_refused_naming_the_slice(tmp_path):
    from meunet.io import require_finite

    slab = np.zeros((3, 4, 4))
    slab[2, 1, 1] = -1e300
    with pytest.raises(InputError, match=r"x.npy: voxel beyond float32's range .* in slice z = 7"):
        require_finite("x.npy", 5, slab)
    require_finite("x.npy", 5, slab.clip(-3e38, 3e38))  # the largest float32 values pass


def test_spacing_that_is_zero_in_float32_is_refused():
    from meunet.io import fits_float32

    assert fits_float32([1e-30, 1, 1], positive=True)
    assert not fits_float32([1e-46, 1, 1], positive=True)  # 0 in float32: a header would store 0
    assert fits_float32([1e-46, 1, 1])


def test_a_nifti_header_with_zero_pixdim_reads_without_nibabels_log(tmp_path, capfd):
    import struct

    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "z.nii")
    data = bytearray((tmp_path / "z.nii").read_bytes())
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    data[252:256] = struct.pack("<hh", 0, 0)  # no qform, no sform: the spacing is pixdim's
    (tmp_path / "z.nii").write_bytes(data)
    assert open_volume(tmp_path / "z.nii").array.shape == (8, 8, 8)
    assert capfd.readouterr().err == ""
