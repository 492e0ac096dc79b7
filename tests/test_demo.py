"""``meunet demo --quick`` end to end: synthetic data, stage 1, prediction, evaluation, report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from meunet.errors import InputError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The folder of one quick demo run through the CLI, and the CLI's stdout."""
    from typer.testing import CliRunner

    from meunet.cli import app

    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_quick_demo_prints_dice_per_class_and_the_report(quick_demo):
    out, stdout = quick_demo
    summary = json.loads((out / "demo.json").read_text())
    assert list(summary["dice"]) == ["background", "gut", "crop"]
    for name, dice in summary["dice"].items():
        assert isinstance(dice, float) and 0.0 <= dice <= 1.0, (name, dice)
        assert re.search(rf"^Dice {name}\s+{dice:.3f}$", stdout, re.MULTILINE)
    assert math.isclose(
        summary["mean_foreground_dice"], (summary["dice"]["gut"] + summary["dice"]["crop"]) / 2
    )
    # 60 steps check the pipeline, not the learning: tests/test_train_fly.py trains this network and data
    # for 150 steps and checks that it learns the gut (Dice > 0.5)
    assert f"report: {out / 'report.html'}" in stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [c["dice"] for c in evaluation["classes"]] == list(summary["dice"].values())


def test_quick_demo_report_shows_its_pictures_and_tables(quick_demo):
    out, _ = quick_demo
    markdown = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == ["model/curves.png", "overlay.png"]
    for link in links:
        assert (out / link).read_bytes()[:8] == PNG
    for row in ("| gut |", "| crop |", "| meunet-stage1 |", "| unet-fov |", "| cascade-post-stage2 |"):
        assert row in markdown
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 2 and 'src="overlay.png"' not in page
    separators = sum(line.startswith("|---") for line in markdown.splitlines())
    assert page.count("<table>") == separators == 4  # timings, Dice, memory at two scales


def test_demo_refuses_a_non_empty_folder_without_force(quick_demo, cli):
    out, _ = quick_demo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = cli("demo", "--out", out, "--quick", "--no-progress")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"error: {out}: is not empty (use --force to replace the demo's outputs in it)"
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_demo_into_a_file_is_refused(tmp_path: Path, cli):
    (tmp_path / "file").write_text("mine")
    result = cli("demo", "--out", tmp_path / "file", "--quick")
    assert result.exit_code == 2 and "exists and is not a folder" in result.stderr
    assert (tmp_path / "file").read_text() == "mine"


def test_force_deletes_only_what_an_earlier_demo_wrote(tmp_path: Path, cli):
    """Without a manifest the demo's names are someone else's; with a finished demo's manifest a file it
    does not list is someone else's; a killed demo's (incomplete) manifest gives its outputs back."""
    from meunet.demo import MANIFEST, _prepare

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "scan.tif").write_text("mine")
    result = cli("demo", "--out", out, "--quick", "--force", "--no-progress")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "was not written by an earlier meunet demo" in result.stderr
    assert (out / "data" / "scan.tif").read_text() == "mine" and not (out / MANIFEST).exists()

    (out / "data" / "scan.tif").unlink()
    (out / "data" / "img_000.nii").write_text("demo's")
    (out / "notes.txt").write_text("mine")
    finished = {"outputs": ["data", "model"], "files": ["data/img_000.nii"]}
    (out / MANIFEST).write_text(json.dumps(finished))
    (out / "model").mkdir()
    (out / "model" / "mine.pt").write_text("mine")
    with pytest.raises(InputError, match=r"mine\.pt: was not written by an earlier meunet demo"):
        _prepare(out, force=True)
    assert (out / "data" / "img_000.nii").exists() and (out / "model" / "mine.pt").exists()

    (out / "model" / "mine.pt").unlink()
    _prepare(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt"]
    assert json.loads((out / MANIFEST).read_text())["files"] is None  # this run's, until it finishes

    (out / "model" / "checkpoint_stage1.pt").parent.mkdir()
    (out / "model" / "checkpoint_stage1.pt").write_text("a killed demo's")
    _prepare(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt"]


def test_quick_demo_lists_every_file_it_wrote(quick_demo):
    from meunet.demo import MANIFEST

    out, _ = quick_demo
    files = json.loads((out / MANIFEST).read_text())["files"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert files == written and "model/stage1.pt" in files and "data/img_000.nii" in files
