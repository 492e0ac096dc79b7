import os
import platform
import subprocess
import sys

import pytest

from meunet import __version__, allocator


def test_version(cli):
    result = cli("version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--bogus",), "error: meunet: No such option: --bogus"),
        (("bogus",), "error: meunet: No such command 'bogus'"),
        (("synth", "fly", "out", "--count", "abc"), "error: meunet synth fly: Invalid value for '--count'"),
        (("synth", "fly", "out", "--seed", "-1"), "error: meunet synth fly: Invalid value for '--seed'"),
        (
            ("synth", "from-labels", "l.nii", "o", "--class-names", "a,,b"),
            "error: --class-names: class name ''",
        ),
        (("evaluate", "p.nii", "t.nii", "--class-names", "a,,b"), "error: --class-names: class name ''"),
        (
            ("evaluate", "p.nii", "t.nii", "--class-names", "a,a,b"),
            "error: --class-names: class name 'a' given",
        ),
        (("train", "x.yaml", "--nproc", "0"), "error: meunet train: Invalid value for '--nproc'"),
        (("predict",), "error: meunet predict: Missing argument"),
        (("info", "a", "b"), "error: meunet info: Got unexpected extra argument"),
        (("convert", "a", "b", "--spacing", "1"), "error: meunet convert: Option '--spacing' requires 3"),
    ],
)
def test_a_refused_command_line_is_one_line_and_exit_2(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_running_out_of_memory_is_one_line_and_exit_2(cli, tmp_path, monkeypatch):
    import meunet.synth

    def too_big(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(meunet.synth, "generate_dataset", too_big)
    result = cli("synth", "fly", tmp_path / "flies", "--shape", "16", "100000", "100000")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: meunet: out of memory") and result.stderr.count("\n") == 1


def _console_script(*args: str, **env: str) -> str:
    """Run the console-script entry point in a fresh process with ``env`` on top of a clean environment."""
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    code = "import sys; from meunet.cli import main; sys.argv[0] = 'meunet'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True, check=True
    ).stdout


glibc = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's"
)


@glibc
def test_entry_point_restarts_with_the_allocator_settings_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    expected = allocator.allocator_tunables() or "(unset)"
    assert f"GLIBC_TUNABLES={expected})" in _console_script("version")
    assert "GLIBC_TUNABLES=(unset))" in _console_script("version", GLIBC_TUNABLES="")
    assert "GLIBC_TUNABLES=glibc.malloc.arena_max=1)" in _console_script(
        "version", GLIBC_TUNABLES="glibc.malloc.arena_max=1"
    )


@glibc
def test_allocator_settings_need_huge_pages_and_yield_to_the_users(monkeypatch, tmp_path):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    setting = tmp_path / "enabled"
    monkeypatch.setattr(allocator, "THP_SETTING", setting)
    assert allocator.allocator_tunables() is None  # no such file: no huge pages known
    for mode in ("[always] madvise never", "always [madvise] never"):
        setting.write_text(mode + "\n")
        assert allocator.allocator_tunables() == allocator.GLIBC_TUNABLES
    setting.write_text("always madvise [never]\n")
    assert allocator.allocator_tunables() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    assert allocator.allocator_tunables() == ""


def test_an_error_line_stays_one_line_whatever_the_path_or_message(cli, tmp_path, monkeypatch):
    """A newline in a file name is escaped, a library's multi-line text joined, a huge one cut."""
    result = cli("info", tmp_path / "a\nb.nii.gz")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: '") and "a\\nb.nii.gz': no such file" in result.stderr
    import meunet.io
    from meunet.errors import InputError

    def fail(path, *args, **kwargs):
        raise InputError(path, "first line\n  second line\n" + "x" * 5000)

    monkeypatch.setattr(meunet.io, "open_volume", fail)
    result = cli("info", tmp_path / "scan.nii.gz")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "first line second line xxx" in result.stderr and len(result.stderr) < 600
