"""Precise BatchNorm statistics before each validation (meunet.train.loop.recalibrate_batch_norm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meunet.train import parse_config
from meunet.train.loop import RECALIBRATION_SAMPLES, Stage, recalibrate_batch_norm


class Samples(torch.utils.data.Dataset):
    """Sample ``i`` of the training stream: a (1, 4, 4, 4) image drawn from a generator seeded by ``i``."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"image": 3.0 + 2.0 * torch.randn(1, 4, 4, 4, generator=g)}


class WithFrozenPart(nn.Sequential):
    """Keeps its last module in evaluation mode, as :class:`meunet.models.Cascade` keeps its stage 1."""

    def train(self, mode: bool = True) -> WithFrozenPart:
        super().train(mode)
        self[-1].eval()
        return self


def _stage(net: nn.Module) -> Stage:
    return Stage(1, net, Samples(), lambda n, b: {"loss": n(b["image"]).mean()}, lambda: None, lambda: None)


def _config(tmp_path):
    pair = {"image": "img.npy", "label": "lab.npy"}  # not read
    values = {
        "output": "m",
        "model": {"classes": ["a", "b"]},
        "data": {"train": [pair], "validation": [pair]},
    }
    return parse_config(
        {**values, "training": {"batch_size": 4}, "precision": "fp32"}, "test", base_dir=tmp_path
    )


def test_statistics_become_the_average_over_the_recalibration_samples(tmp_path):
    torch.manual_seed(0)
    net = WithFrozenPart(
        nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2)
    )
    frozen = nn.BatchNorm3d(2)
    frozen.requires_grad_(False)
    frozen.running_mean.fill_(7.0)
    net.append(frozen)
    norm = net[1]
    norm.running_mean.fill_(100.0)
    norm.momentum = 0.1
    rng = torch.get_rng_state()
    recalibrate_batch_norm(_stage(net), _config(tmp_path), torch.device("cpu"), lambda b, g: b, position=3)
    samples = Samples()
    images = torch.cat([samples[i]["image"][None] for i in range(3, 3 + RECALIBRATION_SAMPLES)])
    with torch.no_grad():
        features = net[0](images)
    # The mean of per-batch means over equal batches is the mean over all samples.
    torch.testing.assert_close(norm.running_mean, features.mean(dim=(0, 2, 3, 4)), rtol=1e-5, atol=1e-5)
    assert norm.momentum == 0.1  # restored after the cumulative average
    assert torch.equal(frozen.running_mean, torch.full((2,), 7.0))  # a frozen part keeps its statistics
    assert torch.equal(torch.get_rng_state(), rng)  # no training random state consumed


def test_network_without_batch_norm_is_untouched(tmp_path):
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.InstanceNorm3d(2, affine=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []
    stage = Stage(1, net, Samples(), lambda n, b: calls.append(1), lambda: None, lambda: None)
    recalibrate_batch_norm(stage, _config(tmp_path), torch.device("cpu"), lambda b, g: b, position=0)
    assert not calls
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("position", [0, 5])
def test_recalibration_depends_only_on_the_position(tmp_path, position):
    def run(position: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
        torch.manual_seed(global_seed)  # the global random state must not matter
        recalibrate_batch_norm(
            _stage(net), _config(tmp_path), torch.device("cpu"),
            lambda b, g: {"image": b["image"] + torch.rand(1, generator=g)}, position,
        )  # fmt: skip
        return net[1].running_var.clone()

    torch.testing.assert_close(run(position, 2), run(position, 3), rtol=0, atol=0)
    assert not torch.equal(run(position, 2), run(position + 1, 2))
