"""meunet.models: parameter count, checkpointing, meU-net context path, cascade fusions, model directory."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meunet.errors import InputError
from meunet.models import (
    Cascade,
    MeUNet,
    UNet3D,
    build_cascade,
    load_model_dir,
    pad_to_multiple,
    save_model_dir,
)

W = (4, 8, 16, 32, 32)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


def _twin(model: nn.Module, **changes) -> nn.Module:
    """Same class and weights as ``model`` with some constructor kwargs changed."""
    twin = type(model)(**{**model.spec, **changes})
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_paper_widths_parameter_count(norm):
    assert sum(p.numel() for p in UNet3D(1, 3, norm=norm).parameters()) == 2_512_515


def test_checkpointed_unet_gives_same_gradients():
    torch.manual_seed(0)
    plain = UNet3D(1, 3, W)
    ckpt = _twin(plain, checkpointing=True)
    x = torch.randn(2, 1, 32, 32, 32)
    target = torch.randint(0, 3, (2, 32, 32, 32))
    for model in (plain, ckpt):
        F.cross_entropy(model(x), target).backward()
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_checkpointed_post_concatenation_stage_2_gives_same_gradients():
    """Stage 2 and its fusion stage checkpointed (the default) train exactly as without checkpointing."""
    torch.manual_seed(0)
    stage1 = MeUNet(1, 3, widths=W, norm="batch")
    plain = Cascade(stage1, UNet3D(1, 3, W, norm="batch"), "post")
    ckpt = Cascade(stage1, _twin(plain.stage2, checkpointing=True), "post")
    ckpt.fuse.load_state_dict(plain.fuse.state_dict())
    x, cached = torch.randn(2, 1, 32, 32, 32), torch.rand(2, 3, 32, 32, 32).half()
    target = torch.randint(0, 3, (2, 32, 32, 32))
    for model in (plain, ckpt):
        F.cross_entropy(model.train()(x, cached), target).backward()
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert any(name.startswith("fuse.") for name in g_plain)
    for name, g in g_plain.items():
        if g is not None:
            torch.testing.assert_close(g_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_context_loss_reaches_only_deeper_levels():
    torch.manual_seed(0)
    model = MeUNet(1, 3, widths=W)
    out = model.context_logits(torch.randn(2, 1, 48, 48, 48))
    assert out.shape == (2, 3, 24, 24, 24)
    F.cross_entropy(out, torch.randint(0, 3, (2, 24, 24, 24))).backward()
    for name, g in _grads(model).items():
        top = name.startswith(("encoders.0.", "decoders.0.", "head."))
        if top:
            assert g is None or not g.any(), name
        else:
            assert g is not None and g.abs().sum() > 0, name


def test_training_forward_returns_local_and_half_resolution_context():
    model = MeUNet(1, 3, widths=W)
    local, context = model(torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 48, 48, 48))
    assert local.shape == (2, 3, 32, 32, 32)
    assert context.shape == (2, 3, 24, 24, 24)
    model.eval()
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("size", [(48, 16, 80), (17, 23, 40), (5, 6, 7)])
def test_any_input_size_is_padded_and_cropped_back(size):
    torch.manual_seed(0)
    model = MeUNet(1, 3, widths=W).eval()
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        out = model(x)
        padded = model(pad_to_multiple(x))
        context = model.context_logits(x)
    assert out.shape == (1, 3, *size)
    # a window's logits equal those of the window zero-padded to multiples of 16, cropped back
    torch.testing.assert_close(out, padded[..., : size[0], : size[1], : size[2]])
    assert context.shape == (1, 3, *((s + 1) // 2 for s in size))


def _one_step(model: MeUNet, local: torch.Tensor, context: torch.Tensor) -> None:
    a, b = model(local, context)
    (a.square().mean() + b.square().mean()).backward()


@pytest.mark.parametrize("norm_cls", [None, nn.BatchNorm3d])
def test_checkpoint_recomputation_updates_batchnorm_once(norm_cls):
    torch.manual_seed(0)
    ckpt = MeUNet(1, 3, widths=W)
    plain = _twin(ckpt, checkpointing=False)
    if norm_cls is not None:  # torch's own BatchNorm: recomputation updates the statistics again
        for stage in [*ckpt.encoders, *ckpt.decoders]:
            for i in (1, 4):
                bn = norm_cls(stage[i].num_features)
                bn.load_state_dict(stage[i].state_dict())
                stage[i] = bn
    local, context = torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 48, 48, 48)
    _one_step(ckpt, local, context)
    _one_step(plain, local, context)
    diffs = [
        (ckpt.state_dict()[k] - v).abs().max().item()
        for k, v in plain.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    if norm_cls is None:
        assert max(diffs) <= 1e-6
    else:
        assert max(diffs) > 1e-3


def _cascade(fusion: str, stage1_output: str = "probs") -> Cascade:
    torch.manual_seed(0)
    stage1 = MeUNet(1, 3, widths=W)
    spec = {"in_channels": 1, "n_classes": 3, "widths": W, "norm": "batch", "checkpointing": False}
    if fusion == "pre":
        spec["in_channels"] = 1 + (3 if stage1_output == "probs" else W[0])
    return build_cascade(stage1, {**spec, "fusion": fusion, "stage1_output": stage1_output})


@pytest.mark.parametrize("fusion", ["post", "pre"])
def test_cascade_trains_with_stage1_frozen(fusion):
    cascade = _cascade(fusion).train()
    frozen = {k: v.clone() for k, v in cascade.stage1.state_dict().items()}
    torch.manual_seed(1)
    image = torch.randn(2, 1, 32, 32, 32)
    target = (image > 0.5).long() + (image > 1.5).long()
    target = target[:, 0]
    cached = cascade.stage1_forward(image).half()  # as training reads it from the stage-1 cache
    optimiser = torch.optim.Adam([p for p in cascade.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = F.cross_entropy(cascade(image, cached), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not cascade.stage1.training
    for k, v in cascade.stage1.state_dict().items():
        assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize(
    ("fusion", "stage1_output"), [("post", "probs"), ("pre", "probs"), ("post", "features")]
)
def test_cascade_uses_given_stage1_output(fusion, stage1_output):
    cascade = _cascade(fusion, stage1_output).eval()
    channels = 3 if stage1_output == "probs" else W[0]
    assert cascade.stage1_channels == channels
    image = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        cached = cascade.stage1_forward(image)
        assert cached.shape == (1, channels, 20, 20, 20)
        torch.testing.assert_close(cascade(image, cached), cascade(image))
        other = torch.zeros_like(cached)
        assert not torch.allclose(cascade(image, other.half()), cascade(image))


def test_model_dir_round_trip(tmp_path):
    cascade = _cascade("post").eval()
    meta = {"classes": ["background", "gut", "crop"], "normalization": {"mean": 1.0}}
    save_model_dir(tmp_path / "m", meta, cascade.stage1, cascade)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "stage1.pt", "stage2.pt"]
    bundle = load_model_dir(tmp_path / "m")
    assert bundle.classes == meta["classes"]
    assert bundle.meta["stage2"]["fusion"] == "post"
    assert not bundle.stage1.training and not bundle.cascade.training
    image = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(bundle.net(image), cascade(image))
    with pytest.raises(InputError, match="--force"):
        save_model_dir(tmp_path / "m", meta, cascade.stage1)
    save_model_dir(tmp_path / "m", meta, cascade.stage1, force=True)
    bundle = load_model_dir(tmp_path / "m")
    assert bundle.cascade is None and not (tmp_path / "m" / "stage2.pt").exists()
    with torch.no_grad():
        torch.testing.assert_close(bundle.net(image), cascade.stage1(image))


class _Payload:
    """A pickle that would run code when loaded without ``weights_only``."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('TMPDIR', '/tmp')}/ran",))


def test_model_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    model = MeUNet(1, 3, widths=W)
    path = tmp_path / "m"
    with pytest.raises(InputError, match="not found"):
        load_model_dir(path)
    save_model_dir(path, {"classes": ["a", "b", "c"]}, model)
    meta = json.loads((path / "model.json").read_text())

    (path / "model.json").write_text(
        json.dumps({**meta, "stage1": {**meta["stage1"], "widths": [4, 8, 16, 32, 64]}})
    )
    with pytest.raises(InputError, match=r"do not match .*: \d+ of another shape \(first ") as err:
        load_model_dir(path)
    assert err.value.path.endswith("stage1.pt") and "\n" not in str(err.value)

    bad_values = [
        {"window": "abc"},
        {"window": [48, 0, 48]},
        {"postprocessing": {"1": "x"}},
        {"postprocessing": {"0": {"min_size": 5}}},
        {"postprocessing": {"1": {"min_size": -1}}},
        {"classes": ["a", "a", "c"]},
        {"classes": [0, 1, 2]},
        {"stage1": {**meta["stage1"], "widths": [-4, 8, 8, 8, 8]}},
        {"stage1": {**meta["stage1"], "widths": [4, 8, 8, 8, 10**12]}},
        {"stage1": {**meta["stage1"], "widths": [0, 8, 8, 8, 8]}},
    ]
    for bad in bad_values:
        (path / "model.json").write_text(json.dumps({**meta, **bad}))
        key = next(iter(bad))
        with pytest.raises(InputError, match=f"'{key}{'.widths' if key == 'stage1' else ''}' must"):
            load_model_dir(path)

    (path / "model.json").write_text(json.dumps(meta))
    weights = torch.load(path / "stage1.pt", weights_only=True)
    for name, value in [("encoders.0.0.weight", float("nan")), ("encoders.0.0.weight", float("inf"))]:
        broken = {k: v.clone() for k, v in weights.items()}
        broken[name].view(-1)[0] = value
        torch.save(broken, path / "stage1.pt")
        with pytest.raises(
            InputError, match=f"1 tensors hold NaN, infinite or negative-variance values \\(first {name}"
        ):
            load_model_dir(path)
    variance = next(k for k in weights if k.endswith("running_var"))  # batch norm, MeUNet's default
    torch.save({**weights, variance: -1 - weights[variance]}, path / "stage1.pt")
    with pytest.raises(InputError, match=f"negative-variance values \\(first {variance}"):
        load_model_dir(path)
    torch.save(weights, path / "stage1.pt")

    (path / "model.json").write_text(json.dumps({**meta, "classes": ["a"]}))
    with pytest.raises(InputError, match="classes"):
        load_model_dir(path)

    (path / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        load_model_dir(path)

    (path / "model.json").write_text(json.dumps(meta))
    data = (path / "stage1.pt").read_bytes()
    (path / "stage1.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="unreadable as torch weights"):
        load_model_dir(path)
    (path / "stage1.pt").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(InputError, match="refused") as err:
        load_model_dir(path)
    assert "weights_only" not in str(err.value) and not (tmp_path / "ran").exists()
    (path / "stage1.pt").unlink()
    with pytest.raises(InputError, match="missing"):
        load_model_dir(path)


def test_bf16_weight_gradients_of_a_map_smaller_than_the_kernel_are_right_on_the_cpu():
    """torch's CPU bf16 convolution got these wrong by up to 1e33 (the 2^3 bottleneck of a 32^3 patch)."""
    from meunet.models.unet import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(16, 16, 3, padding=1)
    for _ in range(20):
        x = torch.relu(torch.randn(4, 16, 2, 2, 2))
        grad_out = torch.randn(4, 16, 2, 2, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        (bf16,) = torch.autograd.grad(y.float(), conv.weight, grad_out)
        (fp32,) = torch.autograd.grad(
            torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1), conv.weight, grad_out
        )
        assert torch.allclose(bf16, fp32, rtol=0.02, atol=0.02 * float(fp32.abs().max()))


def _trained_norms(model: nn.Module) -> nn.Module:
    """``model`` with batch-norm statistics of a few random batches (not the identity), in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, model.spec["in_channels"], 32, 32, 32) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("size", [(32, 32, 32), (17, 40, 23)])
def test_lean_inference_path_equals_the_training_path(norm, size):
    """Without gradients the networks take the lean path (in-place norms, no concatenation, channels-last);
    its logits and features equal the plain path's up to float rounding, and it is what no_grad and
    inference_mode run."""
    from meunet.models.unet import lean

    torch.manual_seed(0)
    model = _trained_norms(MeUNet(1, 3, widths=W, norm=norm))
    x = torch.randn(1, 1, *size) * 3 + 2
    plain = model(x).detach()  # gradients on: the training path
    assert lean() is False
    with torch.inference_mode():
        assert lean() is True
        got = model(x)
        features = model.features(x)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous() and got.shape == (1, 3, *size)
    torch.testing.assert_close(features, model.features(x).detach(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), got)


def test_lean_path_keeps_training_mode_batch_norm_statistics():
    """A batch norm in training mode under no_grad (the statistics recalibration of training) runs as itself:
    the running statistics come out as the plain path's."""
    torch.manual_seed(0)
    a = MeUNet(1, 3, widths=W, norm="batch").train()
    b = _twin(a)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        a(x)
    b(x)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(u, v, msg=k)


@pytest.mark.parametrize("fusion", ["post", "pre"])
def test_lean_cascade_equals_the_training_path(fusion):
    cascade = _cascade(fusion)
    for net in (cascade.stage1, cascade.stage2):
        _trained_norms(net)
    cascade.eval()
    image = torch.randn(1, 1, 24, 20, 36)
    stage1 = torch.rand(1, 3, 24, 20, 36)
    plain = cascade(image, stage1).detach()
    with torch.inference_mode():
        torch.testing.assert_close(cascade(image, stage1), plain, rtol=1e-4, atol=1e-4)
