"""meunet.memory and ``meunet bench memory``: exact saved-tensor bytes, ordering of the configurations."""

from __future__ import annotations

import json

import pytest
import torch

from meunet.memory import CONFIGS, RECORD_KEYS, StepSetting, count_saved_bytes, measure_memory, measure_step

W = (4, 8, 16, 32, 32)


def test_count_saved_bytes_dedups_storages_and_excludes():
    x = torch.randn(1000, requires_grad=True)
    weight = torch.randn(1000, requires_grad=True)

    def fn():
        y = x.exp()  # saves its result y (4000 B)
        z = y[:10].sin()  # saves a view of y: same storage, not counted again
        return (z.sum() + (x * x).sum() + (y * weight).sum()).item()  # x (4000 B); y again; weight excluded

    _, saved = count_saved_bytes(fn, exclude=[weight])
    assert saved == 8000
    _, saved = count_saved_bytes(fn)
    assert saved == 12000


def test_meta_figures_equal_cpu_figures():
    meta = measure_step("meunet-stage1", StepSetting(patch=16, batch=2, widths=W, device="meta"))
    cpu = measure_step("meunet-stage1", StepSetting(patch=16, batch=2, widths=W, device="cpu"))
    assert meta["activation_bytes"] == cpu["activation_bytes"]
    assert meta["params"] == cpu["params"]
    assert meta["step_seconds"] is None and cpu["step_seconds"] > 0


def test_at_paper_scale_every_stage_of_the_cascade_keeps_at_most_15_percent_of_a_plain_unet_on_240():
    """Exact activation bytes on the meta device: stage 1 12.7 %, checkpointed post-concatenation stage 2
    9.8 % of the plain U-net on the 240^3 field of view (160^3 local, batch 1, fp32, paper widths)."""
    paper = StepSetting(device="meta")
    plain = measure_step("unet-fov", paper)["activation_bytes"]
    for config in ("meunet-stage1", "cascade-post-stage2", "cascade-pre-stage2"):
        assert measure_step(config, paper)["activation_bytes"] <= 0.15 * plain, config


def test_memory_ordering_at_small_size():
    records = {r["config"]: r for r in measure_memory(StepSetting(patch=32, batch=2, widths=W))}
    act = {k: r["activation_bytes"] for k, r in records.items()}
    assert act["meunet-stage1"] < act["unet-fov"]
    assert act["unet-local-ckpt"] < act["unet-local"] < act["unet-fov"]
    assert act["unet-fov-ckpt"] < act["unet-fov"]
    # meU-net = checkpointed local path + context path without its top level
    assert act["unet-local-ckpt"] < act["meunet-stage1"] < act["unet-local-ckpt"] + act["unet-fov-ckpt"]
    assert records["meunet-stage1"]["context"] == 48


def test_cpu_peak_from_subprocesses():
    (record,) = measure_memory(StepSetting(patch=32, batch=2, widths=W, device="cpu"), ["unet-local"])
    assert set(record) == set(RECORD_KEYS)
    # the step keeps at least its saved tensors alive at once
    assert record["peak_bytes"] >= record["activation_bytes"] > 0
    assert record["step_seconds"] > 0


def test_cli_bench_memory_json(cli, tmp_path):
    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    args = ["bench", "memory", "--patch", "32", "--widths", "4,8,16,32,32", "--batch", "2"]
    result = cli(*args, "--json", out, "--plot", png)
    assert result.exit_code == 0, result.stderr
    assert "meunet-stage1 / unet-fov activation bytes" in result.stdout
    records = json.loads(out.read_text())
    assert [r["config"] for r in records] == list(CONFIGS)
    for r in records:
        assert list(r) == list(RECORD_KEYS)
        assert (r["patch"], r["context"], r["batch"], r["device"]) == (32, 48, 2, "meta")
        assert r["peak_bytes"] is None and r["step_seconds"] is None
    assert png.read_bytes()[:4] == b"\x89PNG"

    again = cli(*args, "--json", out)
    assert again.exit_code == 2
    assert again.stderr.strip() == f"error: {out}: output exists; use --force to overwrite it"


@pytest.mark.parametrize(
    ("option", "value"), [("--widths", "4,8,16"), ("--device", "gpu"), ("--precision", "fp8")]
)
def test_cli_bench_memory_rejects_bad_options(cli, option, value):
    result = cli("bench", "memory", "--patch", "32", option, value)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {option}: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--patch", "7"), "error: --patch: must be 32 to 1024 voxels, not 7"),
        (("--patch", "100000"), "error: --patch: must be 32 to 1024 voxels, not 100000"),
        (("--context-scale", "inf"), "error: --context-scale: must be at most 4.0, not inf"),
        (("--plot", "p.txt"), "error: p.txt: --plot writes a PNG"),
        (("--device", "mps"), "error: --device: must be cpu, cuda, cuda:N or meta, not 'mps'"),
        (("--device", "cuda:99"), "error: --device: cuda:99 is not available on this machine"),
        (("--plot", "bj.json", "--json", "bj.json"), "error: bj.json: given for two outputs of one command"),
    ],
)
def test_cli_bench_memory_refuses_absurd_sizes_and_outputs_before_any_work(
    cli, tmp_path, monkeypatch, args, expected
):
    monkeypatch.chdir(tmp_path)
    result = cli("bench", "memory", *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(expected), result.stderr
    assert not list(tmp_path.iterdir())
