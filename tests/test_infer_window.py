"""The streaming engine against simple whole-volume references and against MONAI."""

import itertools

import numpy as np
import pytest
import torch

from meunet.infer import Input, SlidingWindow, WindowCounts, importance_map, labels_from_scores, window_starts


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks: on a busy 2-core machine, two torch threads wait on each other ~100x longer than they
    compute (measured 40 ms vs 0.1 ms per forward); one thread for this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(in_channels: int = 1, n_out: int = 3, seed: int = 0) -> torch.nn.Module:
    """A tiny random conv net whose output depends on position near window borders (zero padding)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 4, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv3d(4, n_out, 3, padding=1),
    ).eval()


def _naive(net, volume: np.ndarray, window, overlap: float, weights: np.ndarray, n_out: int, fill, transform):
    """Whole-volume reference: pad with ``fill`` up to the window, transform, visit every window, sum weighted
    logits, divide."""
    size = volume.shape
    padded_size = [max(s, w) for s, w in zip(size, window, strict=True)]
    padded = np.full(padded_size, fill, np.float32)
    padded[: size[0], : size[1], : size[2]] = volume
    padded = transform(padded)
    starts = []
    for s, w in zip(padded_size, window, strict=True):
        n = 1 if s == w else int(np.ceil((s - w) / (w * (1 - overlap)))) + 1
        starts.append([round(v) for v in np.linspace(0, s - w, n)])
    acc = np.zeros((n_out, *padded_size), np.float32)
    weight_sum = np.zeros(padded_size, np.float32)
    for z, y, x in itertools.product(*starts):
        box = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        with torch.no_grad():
            out = net(torch.from_numpy(padded[box][None, None].copy()))[0].numpy()
        out *= weights
        acc[(slice(None), *box)] += out
        weight_sum[box] += weights
    acc /= weight_sum
    return acc[:, : size[0], : size[1], : size[2]]


def test_window_starts_by_hand():
    assert window_starts(100, 40, 0.5) == [0, 20, 40, 60]
    assert window_starts(101, 40, 0.5) == [0, 15, 30, 46, 61]
    assert window_starts(40, 40, 0.5) == [0]
    assert window_starts(17, 40, 0.5) == [0]
    assert window_starts(50, 40, 0.0) == [0, 10]


def test_vote_map_centre_half_cube():
    weights = importance_map((8, 4, 12), "vote")
    assert weights[2:6, 1:3, 3:9].min() == 2 and weights.sum() == 8 * 4 * 12 + 4 * 2 * 6


@pytest.mark.parametrize(
    ("shape", "window", "batch"),
    [((37, 53, 71), (16, 24, 32), 3), ((37, 13, 40), (16, 24, 16), 2), ((16, 24, 32), (16, 24, 32), 1)],
    ids=["awkward", "smaller-than-window", "one-window"],
)
@pytest.mark.parametrize("blend", ["constant", "vote"])
def test_streamed_labels_equal_whole_volume(shape, window, batch, blend):
    net = _net()
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    engine = SlidingWindow(window, overlap=0.5, blend=blend, batch=batch)
    reference_net = net
    if blend == "vote":

        def reference_net(x):
            out = net(x)
            return torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)

    def transform(raw):
        return np.tanh(raw) * 2

    expected = _naive(reference_net, volume, window, 0.5, importance_map(window, blend), 3, -3.0, transform)
    inputs = [Input(volume, transform, fill=-3.0)]
    slabs = list((z0, s.shape[1]) for z0, s in engine.stream(net, inputs, 3))
    assert slabs[0][0] == 0 and all(a + n == b for (a, n), (b, _) in itertools.pairwise(slabs))
    assert sum(n for _, n in slabs) == shape[0]
    got = engine.labels(net, inputs, 3)
    assert got.dtype == np.uint8 and got.shape == shape
    np.testing.assert_array_equal(got, np.argmax(expected, axis=0))


def test_gaussian_matches_monai():
    monai_inferers = pytest.importorskip("monai.inferers", reason="MONAI is not installed")
    window, steps = (16, 24, 32), (2, 1, 3)
    shape = tuple(w + k * w // 2 for w, k in zip(window, steps, strict=True))
    net = _net()
    volume = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    engine = SlidingWindow(window, overlap=0.5, blend="gaussian", batch=2)
    ours = np.concatenate(
        [engine.probabilities_(s).copy() for _, s in engine.stream(net, [volume], 3)], axis=1
    )
    with torch.no_grad():
        logits = monai_inferers.sliding_window_inference(
            torch.from_numpy(volume)[None, None],
            window,
            2,
            net,
            overlap=0.5,
            mode="gaussian",
            sigma_scale=0.125,
        )
    np.testing.assert_allclose(ours, torch.softmax(logits, 1)[0].numpy(), atol=1e-4, rtol=0)


def test_start_z_resumes_identically_and_multiple_sources():
    window = (8, 16, 16)
    shape = (30, 16, 20)
    rng = np.random.default_rng(3)
    image = rng.normal(size=shape).astype(np.float32)
    extra = rng.random((2, *shape)).astype(np.float16)  # channels-first second source, like stage-1 output
    net = _net(in_channels=1)
    second = _net(in_channels=2, seed=1)

    def two_inputs(a, b):
        return net(a) + second(b)

    engine = SlidingWindow(window, overlap=0.5, blend="gaussian")
    whole = np.concatenate([s.copy() for _, s in engine.stream(two_inputs, [image, extra], 3)], axis=1)
    tail = list((z0, s.copy()) for z0, s in engine.stream(two_inputs, [image, extra], 3, start_z=13))
    assert tail[0][0] == 13
    np.testing.assert_array_equal(np.concatenate([s for _, s in tail], axis=1), whole[:, 13:])


def test_skip_empty_and_transform():
    window = (8, 8, 8)
    image = np.zeros((24, 16, 16), np.uint8)
    image[2:5, 3:6, 3:6] = 200  # one bright blob near the start; the rest is air
    counts = WindowCounts()
    engine = SlidingWindow(window, overlap=0.5, blend="gaussian")
    labels = engine.labels(
        _net(),
        [Input(image, transform=lambda raw: raw.astype(np.float32) / 100)],
        3,
        skip_below=50,
        skip_logits=[0.0, -10.0, -10.0],
        counts=counts,
    )
    assert counts.windows == 5 * 3 * 3
    assert counts.skipped == counts.windows - 2 * 2 * 2  # only windows touching z 2..4, y/x 3..5 run
    assert (labels[12:] == 0).all()


def test_tta_equals_flip_average():
    net = _net()
    volume = np.random.default_rng(4).normal(size=(12, 10, 14)).astype(np.float32)

    def flip_mean(x):
        outs = [net(x)]
        for n in (1, 2, 3):
            for dims in itertools.combinations((2, 3, 4), n):
                outs.append(net(x.flip(dims)).flip(dims))
        return sum(outs) / 8

    window = (8, 8, 8)
    with_tta = [
        s.copy() for _, s in SlidingWindow(window, blend="constant", tta=True).stream(net, [volume], 3)
    ]
    by_hand = [s.copy() for _, s in SlidingWindow(window, blend="constant").stream(flip_mean, [volume], 3)]
    np.testing.assert_allclose(np.concatenate(with_tta, 1), np.concatenate(by_hand, 1), atol=1e-5)
    assert not np.allclose(
        np.concatenate(with_tta, 1),
        np.concatenate(
            [s.copy() for _, s in SlidingWindow(window, blend="constant").stream(net, [volume], 3)], 1
        ),
        atol=1e-3,
    )


def test_labels_from_scores_is_argmax():
    scores = np.random.default_rng(5).normal(size=(4, 3, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(labels_from_scores(scores), np.argmax(scores, 0))


def test_bf16_autocast_runs_in_lower_precision():
    net = _net()
    volume = np.random.default_rng(6).normal(size=(20, 24, 24)).astype(np.float32)
    scores = {
        p: np.concatenate(
            [s.copy() for _, s in SlidingWindow((16, 16, 16), precision=p).stream(net, [volume], 3)], 1
        )
        for p in ("fp32", "bf16")
    }
    assert not np.array_equal(scores["fp32"], scores["bf16"])  # autocast did change the arithmetic
    np.testing.assert_allclose(scores["bf16"], scores["fp32"], atol=0.05)
