"""``meunet.infer.postprocess``: the rules, their choice on validation, streamed = in memory, and predict."""

import json
import shutil

import numpy as np
import pytest
import scipy.ndimage as ndi

from meunet.infer import predict
from meunet.infer.postprocess import apply_rules, choose_rules, postprocess_slabs
from meunet.io import read_volume
from test_infer_predict import _image, _model_dir


def _blobs() -> np.ndarray:
    """uint8 (20, 20, 20): class 1 a 4^3 cube, a 2^3 cube and one voxel; class 2 a 3^3 cube."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[10:12, 10:12, 10:12] = 1
    labels[18, 18, 18] = 1
    labels[14:17, 2:5, 2:5] = 2
    return labels


def test_rules_do_what_they_say():
    labels = _blobs()
    largest = apply_rules(labels, {"1": {"largest_component": True}})
    assert (largest == 1).sum() == 64 and (largest == 2).sum() == 27 and largest[10, 10, 10] == 0
    small = apply_rules(labels, {"1": {"min_size": 2}})
    assert (small == 1).sum() == 64 + 8 and small[18, 18, 18] == 0
    assert np.array_equal(apply_rules(labels, {}), labels)
    assert labels.dtype == largest.dtype == np.uint8


def test_a_rule_is_kept_only_where_it_raises_validation_dice():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    truth[14:17, 2:5, 2:5] = 2
    truth[14:18, 14:18, 14:18] = 2  # class 2 really has two objects (27 and 64 voxels)
    prediction = truth.copy()
    prediction[10:12, 10:12, 10:12] = 1  # a false class-1 blob
    rules, dice = choose_rules([(prediction, truth)], 3)
    assert rules == {"1": {"largest_component": True}}  # 'largest' would delete a true class-2 object
    assert dice["1"]["after"] == 1.0 > dice["1"]["before"] and dice["2"]["after"] == dice["2"]["before"] == 1
    noisy = prediction.copy()
    noisy[0, 0, 0] = noisy[0, 19, 0] = 2  # single voxels: removed by a size rule, not by 'largest'
    rules, _ = choose_rules([(noisy, truth)], 3)
    assert rules["2"] == {"min_size": 2}  # half of the smallest true class-2 object (27) is 13, a tenth 2


@pytest.mark.parametrize("seed", range(4))
def test_streamed_slabs_give_the_labels_of_the_whole_volume(seed):
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.random((41, 30, 30)), 1.5)
    labels = np.digitize(x, np.quantile(x, [0.6, 0.8])).astype(np.uint8)  # U-shapes joined across slabs
    rules = {"1": {"min_size": 20}, "2": {"largest_component": True}}
    expected = apply_rules(labels, rules)
    assert (expected != labels).sum() > 50
    for depth in (1, 7, 41):
        slabs = list(postprocess_slabs(labels, rules, depth))
        assert [z for z, _ in slabs] == list(range(0, 41, depth))
        np.testing.assert_array_equal(np.concatenate([s for _, s in slabs]), expected)


def test_predict_applies_the_stored_rules_unless_told_not_to(tmp_path):
    model = _model_dir(tmp_path / "model")
    image = _image(tmp_path / "image.npy")
    predict(model, image, tmp_path / "raw.npy", progress=False)
    raw = read_volume(tmp_path / "raw.npy").array
    present = [c for c in (1, 2) if (raw == c).any()]
    assert present
    rules = {str(present[0]): {"largest_component": True}}
    meta = json.loads((model / "model.json").read_text())
    shutil.copytree(model, tmp_path / "with_rules")
    (tmp_path / "with_rules" / "model.json").write_text(json.dumps({**meta, "postprocessing": rules}))
    stats = predict(tmp_path / "with_rules", image, tmp_path / "post.nii.gz", progress=False)
    assert stats["postprocessing"] == rules
    np.testing.assert_array_equal(read_volume(tmp_path / "post.nii.gz").array, apply_rules(raw, rules))
    assert not list(tmp_path.glob(".post.nii.gz*"))  # the raw-label scratch is gone
    predict(tmp_path / "with_rules", image, tmp_path / "off.npy", progress=False, postprocess=False)
    np.testing.assert_array_equal(read_volume(tmp_path / "off.npy").array, raw)
