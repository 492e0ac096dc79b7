"""``meunet export``: ONNX files checked with onnxruntime, a BioImage Model Zoo package that passes
``bioimageio test``, and bad input."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

from meunet.models import load_model_dir, save_model_dir
from test_infer_predict import NORM, _model_dir
from test_infer_window import _one_torch_thread  # noqa: F401 (autouse fixture: one torch thread here too)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"single": _model_dir(root / "single"), "post": _model_dir(root / "post", cascade="post")}


def test_onnx_cascade_matches_pytorch(models, tmp_path, cli):
    result = cli("export", models["post"], tmp_path / "onnx", "--format", "onnx")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("labels equal") == 3
    out = tmp_path / "onnx"
    names = ["export.json", "model.onnx", "stage1.onnx", "stage2.onnx"]
    assert sorted(p.name for p in out.iterdir()) == names
    checks = json.loads((out / "export.json").read_text())["checks"]
    assert all(c["labels_equal"] and c["max_abs_difference"] < 1e-4 for c in checks.values())
    # another window size (a multiple of 16) and batch 2: ONNX labels equal PyTorch's
    bundle = load_model_dir(models["post"])
    image = torch.randn(2, 1, 32, 16, 48)
    with torch.no_grad():
        stage1 = bundle.cascade.stage1_forward(image)
        expected = bundle.cascade(image, stage1)
    session = onnxruntime.InferenceSession(out / "stage2.onnx", providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": image.numpy(), "stage1": stage1.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    assert np.array_equal(logits.argmax(1), expected.numpy().argmax(1))
    session = onnxruntime.InferenceSession(out / "model.onnx", providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"image": image.numpy()})
    np.testing.assert_allclose(probabilities, torch.softmax(expected, 1).numpy(), atol=1e-5)


def test_bioimageio_package_passes_bioimageio_test(models, tmp_path, cli):
    package = tmp_path / "fly.zip"
    result = cli("export", models["single"], package, "--format", "bioimageio", "--author", "A. Tester")
    assert result.exit_code == 0, result.stderr
    with zipfile.ZipFile(package) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        assert {"weights.pt", "model.onnx", "cover.png", "README.md", "test_input.npy"} <= set(z.namelist())
    assert rdf["format_version"].startswith("0.5") and rdf["license"] == "MIT"
    assert "Memory-efficient segmentation" in rdf["cite"][0]["text"]
    (raw,) = rdf["inputs"]
    steps = [p for p in raw["preprocessing"] if p["id"] != "ensure_dtype"]  # bioimageio adds dtype steps
    assert [p["id"] for p in steps] == ["clip", "fixed_zero_mean_unit_variance"]
    assert steps[0]["kwargs"] == {"min": NORM.clip_low, "max": NORM.clip_high}
    assert steps[1]["kwargs"] == {"mean": NORM.mean, "std": NORM.std}
    assert raw["axes"][2]["size"] == {"min": 16, "step": 16}
    (out,) = rdf["outputs"]
    assert [a.get("halo") for a in out["axes"][2:]] == [4, 4, 4]
    assert out["axes"][1]["channel_names"] == ["background", "gut", "crop"]
    assert rdf["weights"]["onnx"]["parent"] == "pytorch_state_dict"
    bioimageio = Path(sys.executable).with_name("bioimageio")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([bioimageio, "test", package], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout and "failed" not in run.stdout


def test_export_bad_input_writes_nothing(models, tmp_path, cli):
    not_model = tmp_path / "empty"
    not_model.mkdir()
    result = cli("export", not_model, tmp_path / "out.zip", "--format", "bioimageio")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "not a meunet model" in result.stderr
    existing = tmp_path / "out"
    existing.mkdir()
    result = cli("export", models["single"], existing, "--format", "onnx")
    assert result.exit_code == 2 and "--force" in result.stderr
    result = cli("export", models["single"], tmp_path / "x.onnx", "--format", "tflite")
    assert result.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"] and not any(existing.iterdir())
    assert cli("export", models["single"], existing, "--format", "onnx", "--force").exit_code == 0
    assert (existing / "model.onnx").is_file()


def test_onnx_of_large_logits_is_compared_relative_to_their_size(models, tmp_path, cli):
    """Batch norm after little training can give logits in the thousands, which ONNX and PyTorch round
    differently by about 1e-2: that is float rounding (the labels agree), not a broken conversion."""
    bundle = load_model_dir(models["single"])
    with torch.no_grad():
        bundle.stage1.head.weight.mul_(30000)
    keep = ("classes", "normalization", "window", "spacing")
    save_model_dir(tmp_path / "sharp", {k: bundle.meta[k] for k in keep}, bundle.stage1, None)
    result = cli("export", tmp_path / "sharp", tmp_path / "onnx", "--format", "onnx")
    assert result.exit_code == 0, result.stderr
    checks = json.loads((tmp_path / "onnx" / "export.json").read_text())["checks"]
    assert checks["stage1.onnx"]["max_abs_difference"] > 1e-3  # the old absolute tolerance refused it
    assert all(c["labels_equal"] for c in checks.values())
