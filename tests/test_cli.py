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
