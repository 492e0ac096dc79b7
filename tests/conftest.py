"""Shared fixtures: the real scans in ../shared/data/real, and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of the real microCT scans; skips the test with a message where it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real scans not found at {REAL_DATA} (../shared/data/real is absent)")
    return REAL_DATA


@pytest.fixture()
def cli():
    """Run ``meunet ARGS...`` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from meunet.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run
