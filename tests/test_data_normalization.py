import numpy as np

from meunet.data.normalization import Normalization


def test_fit_apply_roundtrip():
    rng = np.random.default_rng(0)
    sample = rng.normal(100, 20, 100_000).astype(np.float32)
    norm = Normalization.fit([sample[:50_000], sample[50_000:]])
    out = norm.apply(sample)
    assert out.dtype == np.float32 and out.shape == sample.shape
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3
    assert out.max() <= (norm.clip_high - norm.mean) / norm.std + 1e-5
    assert Normalization.from_dict(norm.to_dict()) == norm


def test_constant_input_does_not_divide_by_zero():
    norm = Normalization.fit([np.full(10, 7, np.uint8)])
    assert np.isfinite(norm.apply(np.full((2, 2, 2), 7, np.uint8))).all()
