import os
import platform
import subprocess
import sys

import pytest

from meunet import GLIBC_TUNABLES, __version__


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


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's"
)
def test_entry_point_restarts_with_the_allocator_settings_unless_the_user_set_them():
    assert f"GLIBC_TUNABLES={GLIBC_TUNABLES})" in _console_script("version")
    assert "GLIBC_TUNABLES=(unset))" in _console_script("version", GLIBC_TUNABLES="")
    assert "GLIBC_TUNABLES=glibc.malloc.arena_max=1)" in _console_script(
        "version", GLIBC_TUNABLES="glibc.malloc.arena_max=1"
    )
