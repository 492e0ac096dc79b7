"""The plain U-net baselines of the paper table: ``model.stage1: unet`` trains, saves, loads and predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meunet.errors import InputError
from meunet.infer import predict
from meunet.io import Volume, read_volume, write_volume
from meunet.models import MeUNet, UNet3D, load_model_dir, save_model_dir
from meunet.train import parse_config, train


def _box(seed: int, shape=(32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A bright 12^3 box (class 1) at a random place in noise: uint8 image and labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    z, y, x = rng.integers(4, 16, 3)
    labels[z : z + 12, y : y + 12, x : x + 12] = 1
    return (60 + 80 * labels + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unet")
    pairs = [{kind: str(folder / f"{kind}{i}.npy") for kind in ("image", "label")} for i in range(2)]
    for i, pair in enumerate(pairs):
        for path, array in zip(pair.values(), _box(i), strict=True):
            write_volume(path, Volume(array))
    config = {
        "output": str(folder / "model"),
        "stages": 1,
        "model": {
            "classes": ["background", "ball"],
            "stage1": "unet",
            "widths": [2, 4, 4, 4, 4],
            "norm": "batch",
        },
        "data": {
            "train": pairs[:1],
            "validation": pairs[1:],
        },
        "patch": {"size": 16},
        "training": {"batch_size": 2, "max_iterations": 4, "validate_every": 2, "progress": False},
    }
    return train(parse_config(config, "cfg"))


def test_unet_stage1_is_saved_as_a_plain_unet_and_predicts(unet_model, tmp_path):
    meta = json.loads((unet_model / "model.json").read_text())
    assert meta["stage1"]["architecture"] == "unet" and meta["train_config"]["model"]["stage1"] == "unet"
    bundle = load_model_dir(unet_model)
    assert type(bundle.stage1) is UNet3D and not isinstance(bundle.stage1, MeUNet)
    rows = (unet_model / "train_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    # No context path: the context loss column stays empty, the local loss is the whole loss.
    assert len(rows) == 3
    for row in rows[1:]:
        values = dict(zip(header, row.split(","), strict=True))
        assert values["context_loss"] == "" and values["loss"] == values["local_loss"]
    image = read_volume(unet_model.parent / "image1.npy")
    stats = predict(unet_model, unet_model.parent / "image1.npy", tmp_path / "pred.npy", progress=False)
    labels = read_volume(tmp_path / "pred.npy").array
    assert labels.shape == image.array.shape and labels.dtype == np.uint8 and stats["windows"] > 0


def test_stage1_architecture_key_defaults_to_meunet_and_unknown_is_refused(tmp_path):
    path = save_model_dir(tmp_path / "m", {"classes": ["a", "b"]}, MeUNet(1, 2, widths=[2, 4, 4, 4, 4]))
    meta = json.loads((path / "model.json").read_text())
    assert meta["stage1"]["architecture"] == "meunet"
    spec = {k: v for k, v in meta["stage1"].items() if k != "architecture"}
    (path / "model.json").write_text(json.dumps({**meta, "stage1": spec}))  # written before the key existed
    assert type(load_model_dir(path).stage1) is MeUNet
    (path / "model.json").write_text(json.dumps({**meta, "stage1": {**spec, "architecture": "vnet"}}))
    with pytest.raises(InputError, match="architecture"):
        load_model_dir(path)
