"""Safe outputs (meunet.io._safe): one writer per output, unique temporary names, one line on a full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meunet.errors import InputError
from meunet.io import atomic_output, create_writer, open_volume, write_volume
from meunet.io._volume import Volume
from meunet.train.checkpoint import load_checkpoint, save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLD = """import sys
from meunet.io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def other_run():
    """Start another process that holds the output lock of a path until the test ends."""
    procs = []

    def hold(path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env, text=True, **pipes)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"

    yield hold
    for proc in procs:
        proc.communicate("")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    code = "from meunet.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def test_second_volume_writer_stops_and_first_output_is_correct(tmp_path):
    out = tmp_path / "labels.zarr"
    data = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    np.save(tmp_path / "in.npy", data[::-1].copy())
    with create_writer(out, data.shape, np.uint8) as first:
        first.write(0, data[:2])
        second = _cli("convert", str(tmp_path / "in.npy"), str(out))  # another process, same output
        first.write(2, data[2:])
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0
    assert "another run is writing this output" in second.stderr
    np.testing.assert_array_equal(open_volume(out).array[...], data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "labels.zarr"]


def test_two_writers_in_one_process_on_one_output(tmp_path):
    out = tmp_path / "a.npy"
    with create_writer(out, (2, 4, 4), np.uint8) as first:
        with pytest.raises(InputError, match="another run"), create_writer(out, (2, 4, 4), np.uint8):
            pass
        first.write(0, np.ones((2, 4, 4), np.uint8))
    assert (np.load(out) == 1).all()


def test_writer_finding_the_output_created_meanwhile_refuses(tmp_path):
    out = tmp_path / "a.npy"
    writer = create_writer(out, (1, 2, 2), np.uint8)  # checked: not there yet
    np.save(out, np.zeros((1, 2, 2), np.uint8))  # another run finished first
    with pytest.raises(InputError, match="use --force"), writer:
        pass
    assert np.load(out).shape == (1, 2, 2)


def test_checkpoint_locked_by_another_process(tmp_path, other_run):
    path = tmp_path / "checkpoint_stage1.pt"
    save_checkpoint(path, {"net": {}, "step": 1})
    other_run(path)
    with pytest.raises(InputError, match="another run is writing"):
        save_checkpoint(path, {"net": {}, "step": 2})
    assert load_checkpoint(path) == {"net": {}, "step": 1}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".checkpoint_stage1.pt.lock", "checkpoint_stage1.pt"]


def test_atomic_output_unique_temporary_and_cleanup(tmp_path):
    path = tmp_path / "stats.json"
    names = []
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        names.append(tmp)
        tmp.write_text("half")
        raise RuntimeError("boom")
    with atomic_output(path) as tmp:
        names.append(tmp)
        tmp.write_text("{}")
    assert names[0] != names[1] and str(os.getpid()) in names[0].name
    assert path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code):
    def failing(fd, data, offset):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwrite", failing)
    out = tmp_path / "out.nii"
    with pytest.raises(InputError, match=f"cannot write: {os.strerror(code)}"):
        write_volume(out, Volume(np.zeros((3, 4, 4), np.uint8)))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_atomic_output(tmp_path):
    path = tmp_path / "report.md"
    with pytest.raises(InputError, match="No space left"), atomic_output(path) as tmp:
        tmp.write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_a_folder_of_meunets_never_one_holding_other_files(tmp_path):
    path = tmp_path / "export"
    path.mkdir()
    (path / "model.onnx").write_text("an earlier export")
    with atomic_output(path) as tmp:
        tmp.mkdir()
        (tmp / "export.json").write_text("new")
    assert [p.name for p in path.iterdir()] == ["export.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    (path / "old.txt").write_text("a user's")
    with pytest.raises(InputError, match=r"holds old\.txt, which meunet did not write"), atomic_output(path):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in path.iterdir()) == ["export.json", "old.txt"]
    (tmp_path / "report.json").mkdir()  # a folder where a file goes is replaced only when empty
    with atomic_output(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "report.json").read_text() == "{}"


def test_force_false_refuses_existing_output_under_the_lock(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("keep")
    with pytest.raises(InputError, match="use --force"), atomic_output(path, force=False):
        pass
    assert path.read_text() == "keep"


def test_a_raw_output_larger_than_the_free_space_is_refused_before_any_write(tmp_path, monkeypatch):
    """Raw outputs are sparse until written: the free space is checked when the file is made."""
    import shutil

    import meunet.io._writer as writer

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    for name in ("out.nii", "out.npy", "out.tif"):
        with pytest.raises(InputError, match=r"No space left on device: the output needs 0\.1 MiB"):
            write_volume(tmp_path / name, Volume(np.zeros((8, 100, 100), np.uint8)))
    assert list(tmp_path.iterdir()) == []


def test_nifti_refuses_a_side_its_header_cannot_hold(tmp_path):
    with pytest.raises(InputError, match=r"at most 32767 voxels per axis, not \(40000, 2, 2\): use \.zarr"):
        write_volume(tmp_path / "long.nii.gz", Volume(np.zeros((40000, 2, 2), np.uint8)))
    assert list(tmp_path.iterdir()) == []
    write_volume(tmp_path / "long.zarr", Volume(np.zeros((40000, 2, 2), np.uint8)))
    assert open_volume(tmp_path / "long.zarr").array.shape == (40000, 2, 2)


def test_a_folder_output_replaces_a_file_with_force(tmp_path):
    path = tmp_path / "export.onnx"
    path.write_text("an earlier file")
    with atomic_output(path) as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_text("new")
    assert [p.name for p in path.iterdir()] == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["export.onnx"]


def test_an_output_or_input_in_a_loop_of_symbolic_links_is_one_line(tmp_path):
    from meunet.io import check_outputs

    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    for outputs, inputs in [
        ([tmp_path / "a.nii.gz"], []),
        ([tmp_path / "c.nii.gz"], [tmp_path / "a.nii.gz"]),
    ]:
        with pytest.raises(InputError, match=r"a\.nii\.gz: is a loop of symbolic links"):
            check_outputs(outputs, force=True, inputs=inputs)
