"""``meunet.distributed``: block geometry, bit-identical blocks, Dask runs on a loopback LocalCluster of two
worker processes (identical to single-process prediction, after a worker is killed, after a resumed run),
and the OME-Zarr labels pyramid."""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from meunet.allocator import allocator_tunables
from meunet.data.normalization import Normalization
from meunet.distributed import SCRATCH, connect, plan_blocks, predict_distributed
from meunet.errors import InputError
from meunet.infer import Input, Predictor, PredictSettings, SlidingWindow, predict, windows_over
from meunet.io import Volume, downsample_mode, read_volume, volume_pairs, write_volume
from meunet.models import Cascade, MeUNet, UNet3D, save_model_dir

WIDTHS = [2, 4, 4, 4, 4]
NORM = Normalization(clip_low=0.0, clip_high=200.0, mean=60.0, std=40.0)
SHAPE = (40, 48, 48)
WINDOW = (16, 16, 16)
CHUNKS = (8, 24, 24)
BLOCK = (8, 24, 24)  # 5 x 2 x 2 = 20 blocks


def _init(module: nn.Module) -> nn.Module:
    """Fixed random weights that keep activations at scale, so labels vary (default init gives one class)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return module


def _model_dir(path: Path, cascade: bool = False) -> Path:
    torch.manual_seed(6)
    stage1 = _init(MeUNet(1, 3, widths=WIDTHS))
    stage2 = None
    if cascade:
        stage2 = Cascade(stage1, _init(UNet3D(1, 3, widths=WIDTHS)), "post", "probs")
    meta = {"classes": ["background", "gut", "crop"], "normalization": NORM.to_dict(), "window": list(WINDOW)}
    return save_model_dir(path, meta, stage1, stage2)


def _image(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 30, shape, dtype=np.uint8)
    array[10:30, 8:40, 6:30] += 120  # a bright object in air
    return array


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in each single-threaded Dask worker (and far faster on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A model, two images (Zarr, read in place; NIfTI, converted) and their single-process labels."""
    root = tmp_path_factory.mktemp("distributed")
    images = root / "images"
    images.mkdir()
    paths = {"model": _model_dir(root / "model"), "images": images}
    paths["a"] = images / "a.zarr"
    paths["b"] = images / "b.nii.gz"
    write_volume(paths["a"], Volume(_image(), spacing=(0.5, 0.25, 0.25)), chunks=(8, 16, 16))
    write_volume(paths["b"], Volume(_image(seed=1)[:, :40]))
    (images / "notes.txt").write_text("not a volume")
    for name in ("a", "b"):
        paths[f"ref_{name}"] = root / f"ref_{name}.npy"
        predict(paths["model"], paths[name], paths[f"ref_{name}"], progress=False)
    return paths


@pytest.fixture(scope="module")
def client():
    with connect("local:2") as c:
        yield c


def _labels(path: Path) -> np.ndarray:
    return zarr.open_group(path, mode="r")["0"][...]


def _reference(data, name: str) -> np.ndarray:
    return read_volume(data[f"ref_{name}"]).array


def _relative(starts, span):
    return [[s - lo for s in axis] for axis, (lo, _) in zip(starts, span, strict=True)]


def _windows_per_block(shape, block) -> int:
    grid = SlidingWindow(WINDOW).grid(shape)
    return [
        int(np.prod([len(s) for s in windows_over(grid, WINDOW, core, shape)[0]]))
        for core in plan_blocks(shape, block)
    ]


@pytest.mark.parametrize(
    ("shape", "window", "overlap", "block"),
    [((40, 48, 48), (16, 16, 16), 0.5, (8, 24, 24)), ((37, 9, 70), (12, 16, 20), 0.3, (10, 9, 32))],
)
def test_blocks_tile_the_volume_and_take_every_window_that_touches_them(shape, window, overlap, block):
    grid = SlidingWindow(window, overlap=overlap).grid(shape)
    cover = np.zeros(shape, np.uint8)
    for core in plan_blocks(shape, block):
        cover[tuple(slice(*c) for c in core)] += 1
        starts, span = windows_over(grid, window, core, shape)
        for start in itertools.product(*grid):
            touches = all(s < hi and s + w > lo for s, w, (lo, hi) in zip(start, window, core, strict=True))
            taken = all(s in axis for s, axis in zip(start, starts, strict=True))
            assert touches == taken
        assert all(a <= lo and hi <= b <= n for (lo, hi), (a, b), n in zip(core, span, shape, strict=True))
    assert (cover == 1).all()


@pytest.mark.parametrize(("blend", "shape"), [("gaussian", (40, 48, 48)), ("constant", (40, 30, 12))])
def test_block_scores_are_bit_identical_to_the_whole_volume(blend, shape):
    torch.manual_seed(6)
    net = _init(MeUNet(1, 3, widths=WIDTHS)).eval()
    image = Input(_image()[: shape[0], : shape[1], : shape[2]], NORM.apply)
    engine = SlidingWindow(WINDOW, blend=blend)
    whole = np.concatenate([s.copy() for _, s in engine.stream(net, [image], 3)], axis=1)
    grid = engine.grid(shape)
    for core in plan_blocks(shape, (16, 24, 24)):
        starts, span = windows_over(grid, WINDOW, core, shape)
        part = Input(image.array[tuple(slice(*s) for s in span)], NORM.apply)
        scores = np.concatenate(
            [s.copy() for _, s in engine.stream(net, [part], 3, starts=_relative(starts, span))], 1
        )
        inside = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(core, span, strict=True))
        assert np.array_equal(
            scores[(slice(None), *inside)], whole[(slice(None), *(slice(*c) for c in core))]
        )


def test_cascade_blocks_equal_single_process_prediction(tmp_path):
    model = _model_dir(tmp_path / "cascade", cascade=True)
    image = _image((24, 32, 30))
    write_volume(tmp_path / "image.npy", Volume(image))
    predict(model, tmp_path / "image.npy", tmp_path / "ref.npy", skip_empty=True, progress=False)
    expected = read_volume(tmp_path / "ref.npy").array
    predictor = Predictor(model, PredictSettings(window=WINDOW, skip_empty=True))
    got = np.zeros_like(expected)
    for core in plan_blocks(image.shape, (8, 16, 16)):
        got[tuple(slice(*c) for c in core)] = predictor.block(image, core)
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def folder_run(data, client, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The folder of two images predicted on the cluster: (output folder, statistics)."""
    out = tmp_path_factory.mktemp("folder_run") / "out"
    stats = predict_distributed(
        data["model"], data["images"], out, client, chunks=CHUNKS, block=BLOCK, progress=False
    )
    return out, stats


def test_folder_of_volumes_on_two_workers_equals_single_process(data, folder_run, tmp_path):
    pairs = volume_pairs(data["images"], tmp_path / "out")
    assert [(i.name, o.name) for i, o in pairs] == [("a.zarr", "a.zarr"), ("b.nii.gz", "b.zarr")]
    out, stats = folder_run
    for name, s in zip("ab", stats, strict=True):
        expected = _reference(data, name)
        assert len(np.unique(expected)) == 3
        np.testing.assert_array_equal(_labels(out / f"{name}.zarr"), expected)
        assert s["blocks"] == 20 and s["blocks_reused"] == 0
        assert s["windows"] == sum(_windows_per_block(expected.shape, BLOCK))
    assert sorted(p.name for p in out.iterdir()) == ["a.zarr", "b.zarr"]  # no scratch left
    assert read_volume(out / "a.zarr").spacing == (0.5, 0.25, 0.25)


def test_ome_zarr_labels_pyramid_opens_with_the_ome_zarr_reader(folder_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    out = folder_run[0] / "a.zarr"
    node = next(iter(Reader(parse_url(str(out)))()))
    assert {type(s) for s in node.specs} >= {Label, Multiscales}
    levels = [np.asarray(level) for level in node.data]
    assert [level.shape for level in levels] == [(40, 48, 48), (20, 24, 24), (10, 12, 12), (5, 6, 6)]
    for fine, coarse in itertools.pairwise(levels):
        np.testing.assert_array_equal(coarse, downsample_mode(fine))
    datasets = node.metadata["coordinateTransformations"]
    assert datasets[1] == [
        {"type": "scale", "scale": [1.0, 0.5, 0.5]},
        {"type": "translation", "translation": [0.25, 0.125, 0.125]},
    ]
    properties = zarr.open_group(out, mode="r").attrs["ome"]["image-label"]["properties"]
    assert [p["name"] for p in properties] == ["background", "gut", "crop"]


def test_downsample_mode_takes_the_most_frequent_label_of_each_cell():
    labels = np.random.default_rng(0).integers(0, 4, (7, 6, 5), dtype=np.uint8)
    got = downsample_mode(labels)
    assert got.shape == (4, 3, 3) and got.dtype == np.uint8
    for z, y, x in np.ndindex(got.shape):
        cell = labels[2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
        assert got[z, y, x] == np.argmax(np.bincount(cell.ravel(), minlength=4))


def test_local_workers_start_with_meunets_allocator_settings(client):
    def environ() -> tuple:
        return os.environ.get("GLIBC_TUNABLES"), os.environ.get("MALLOC_TRIM_THRESHOLD_")

    expected = (allocator_tunables(), None)
    assert set(client.run(environ).values()) == {expected}


def test_worker_killed_mid_run_does_not_change_the_output(data, client, tmp_path):
    out = tmp_path / "a.zarr"
    pids = client.run(os.getpid)
    result = {}

    def run():
        try:
            result["stats"] = predict_distributed(
                data["model"], data["a"], out, client, chunks=CHUNKS, block=BLOCK, progress=False
            )
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    done = tmp_path / ".a.zarr.partial" / SCRATCH / "done"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)
    done_at_kill = len(list(done.iterdir()))
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    thread.join(300)
    assert "error" not in result, result.get("error")
    assert 0 < done_at_kill < 20
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != set(pids.values())  # the nanny started a new worker
    np.testing.assert_array_equal(_labels(out), _reference(data, "a"))


def test_run_resumed_after_the_client_died_skips_written_blocks(data, client, tmp_path):
    out = tmp_path / "a.zarr"
    script = textwrap.dedent(
        f"""
        from meunet.distributed import predict_distributed
        predict_distributed({str(data["model"])!r}, {str(data["a"])!r}, {str(out)!r},
                            {client.scheduler.address!r}, chunks={CHUNKS}, block={BLOCK}, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    done = tmp_path / ".a.zarr.partial" / SCRATCH / "done"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    # the scheduler drops the dead client's tasks; those already running finish: wait for idle workers
    while any(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
        time.sleep(0.05)
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert 0 < len(before) < 20 and not out.exists()
    with pytest.raises(InputError, match="another model, input or settings"):
        predict_distributed(
            data["model"], data["a"], out, client, PredictSettings(blend="constant"), chunks=CHUNKS,
            block=BLOCK, progress=False, resume=True,
        )  # fmt: skip
    [stats] = predict_distributed(
        data["model"], data["a"], out, client, chunks=CHUNKS, block=BLOCK, progress=False, resume=True
    )
    per_block = dict(zip(_block_names(), _windows_per_block(SHAPE, BLOCK), strict=True))
    assert stats["blocks_reused"] == len(before)
    assert stats["windows"] == sum(n for name, n in per_block.items() if name not in before)
    np.testing.assert_array_equal(_labels(out), _reference(data, "a"))


def _block_names() -> list[str]:
    return ["_".join(f"{lo}-{hi}" for lo, hi in core) for core in plan_blocks(SHAPE, BLOCK)]


def test_cli_predict_dask_on_a_running_scheduler(data, client, cli, tmp_path):
    out = tmp_path / "a.zarr"
    result = cli(
        "predict", data["model"], data["a"], out, "--dask", client.scheduler.address, "--no-progress"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: 1 blocks (0 from an earlier run), 100 windows (0 skipped)")
    np.testing.assert_array_equal(_labels(out), _reference(data, "a"))
    result = cli("predict", data["model"], data["a"], tmp_path / "b.zarr", "--dask", "local:two")
    assert result.exit_code == 2 and result.stderr.startswith("error: local:two: use local:N")
    result = cli(
        "predict", data["model"], data["a"], tmp_path / "b.nii.gz", "--dask", client.scheduler.address
    )
    assert result.exit_code == 2 and "ending in .zarr" in result.stderr
    assert not (tmp_path / "b.nii.gz").exists() and not (tmp_path / "b.zarr").exists()


def test_existing_output_and_empty_folder_are_input_errors(data, client, tmp_path):
    (tmp_path / "a.zarr").mkdir()
    with pytest.raises(InputError, match="exists"):
        predict_distributed(data["model"], data["a"], tmp_path / "a.zarr", client, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no volumes"):
        predict_distributed(data["model"], tmp_path / "empty", tmp_path / "out", client, progress=False)


def test_a_nan_voxel_stops_a_dask_run_naming_the_input(data, client, tmp_path):
    """The worker's InputError reaches the client whole (it pickles), naming the file the user gave."""
    image = _image().astype(np.float32)
    image[20, 5, 5] = np.nan
    write_volume(tmp_path / "nan.nii.gz", Volume(image))
    with pytest.raises(InputError, match=r"nan\.nii\.gz: NaN or infinite voxel in slice z"):
        predict_distributed(
            data["model"], tmp_path / "nan.nii.gz", tmp_path / "out.zarr", client, progress=False
        )
    assert not (tmp_path / "out.zarr").exists()


def test_post_processing_on_dask_equals_single_process(data, client, tmp_path):
    import json

    from meunet.infer.postprocess import apply_rules

    model = tmp_path / "model"
    shutil.copytree(data["model"], model)
    reference = _reference(data, "a")
    present = next(c for c in (1, 2) if (reference == c).any())
    rules = {str(present): {"largest_component": True}}
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**meta, "postprocessing": rules}))
    predict_distributed(
        model, data["a"], tmp_path / "a.zarr", client, chunks=CHUNKS, block=BLOCK, progress=False
    )
    expected = apply_rules(reference, rules)
    assert not np.array_equal(expected, reference)  # the rule changes something here
    np.testing.assert_array_equal(_labels(tmp_path / "a.zarr"), expected)
