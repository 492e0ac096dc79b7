"""Markdown and self-contained HTML reports (``meunet.report.write_report``) and the memory table."""

from __future__ import annotations

import base64
import re

from meunet.report import Picture, Table, html_report, markdown_report, memory_table, write_report

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


def _sections(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(PNG)
    table = Table(("class", "Dice"), [("gut", "0.812"), ("crop <small>", "0.500")])
    return [
        ("Scores", ["Dice of `gut` & crop:", table]),
        ("Pictures", [Picture(tmp_path / "pics" / "a.png", "an overlay")]),
    ]


def test_markdown_links_pictures_relative_to_the_report(tmp_path):
    text = markdown_report("Demo", _sections(tmp_path), tmp_path)
    assert text.startswith("# Demo\n\n## Scores\n\nDice of `gut` & crop:\n\n| class | Dice |\n|---|---|\n")
    assert "| gut | 0.812 |\n| crop <small> | 0.500 |\n" in text
    assert "![an overlay](pics/a.png)" in text


def test_html_is_self_contained_and_escaped(tmp_path):
    page = html_report("Demo <1>", _sections(tmp_path))
    assert "<title>Demo &lt;1&gt;</title>" in page
    assert "<p>Dice of <code>gut</code> &amp; crop:</p>" in page
    assert "<td>crop &lt;small&gt;</td><td>0.500</td>" in page
    (data,) = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="an overlay">', page)
    assert base64.b64decode(data) == PNG
    assert "pics/a.png" not in page


def test_write_report_writes_both_files_and_no_temporaries(tmp_path):
    sections = _sections(tmp_path)
    md, page = write_report(tmp_path, "Demo", sections)
    assert (md.name, page.name) == ("report.md", "report.html")
    assert md.read_text() == markdown_report("Demo", sections, tmp_path)
    assert page.read_text() == html_report("Demo", sections)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pics", "report.html", "report.md"]


def test_memory_table_in_mib_with_missing_measurements_as_dashes():
    records = [
        {"config": "meunet-stage1", "params": 1234567, "activation_bytes": 3 * 2**20, "peak_bytes": None,
         "step_seconds": None},
        {"config": "unet-fov", "params": 10, "activation_bytes": 2**30, "peak_bytes": 2**29,
         "step_seconds": 1.234},
    ]  # fmt: skip
    table = memory_table(records)
    assert table.header == ("configuration", "parameters", "activation MiB", "peak MiB", "step s")
    assert [list(r) for r in table.rows] == [
        ["meunet-stage1", "1,234,567", "3.0", "-", "-"],
        ["unet-fov", "10", "1,024.0", "512.0", "1.23"],
    ]
