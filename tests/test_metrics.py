import numpy as np
import pytest
import torch

from meunet.metrics import confusion_matrix, dice_from_confusion, evaluate_labels, iou_from_confusion


def test_confusion_dice_iou_by_hand():
    truth = np.array([0, 0, 1, 1, 2, 2], np.uint8)
    pred = np.array([0, 1, 1, 1, 2, 0], np.uint8)
    cm = confusion_matrix(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    np.testing.assert_allclose(dice_from_confusion(cm), [2 / 4, 4 / 5, 2 / 3])
    np.testing.assert_allclose(iou_from_confusion(cm), [1 / 3, 2 / 3, 1 / 2])


def test_slab_sums_equal_whole():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (10, 7, 5), dtype=np.uint8)
    pred = rng.integers(0, 3, (10, 7, 5), dtype=np.uint8)
    whole = confusion_matrix(pred, truth, 3)
    slabs = sum(confusion_matrix(pred[z : z + 3], truth[z : z + 3], 3) for z in range(0, 10, 3))
    assert (whole == slabs).all()


def test_absent_class_is_nan():
    cm = confusion_matrix(np.zeros(4, np.uint8), np.zeros(4, np.uint8), 2)
    assert np.isnan(dice_from_confusion(cm)[1])


def _blobs(seed: int, shape=(20, 24, 28)) -> np.ndarray:
    """Random smooth 3-class label volume (thresholded smoothed noise)."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2)
    return np.digitize(noise, np.quantile(noise, [0.6, 0.85])).astype(np.uint8)


def test_evaluate_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is not installed")
    truth, pred = _blobs(0), _blobs(1)
    pred[:5] = truth[:5]  # some agreement so the scores are not near zero
    spacing = (2.0, 0.5, 0.75)
    result = evaluate_labels(pred, truth, spacing, slab=6)

    def one_hot(labels):
        return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(3, 0, 1, 2)[None]

    y_pred, y = one_hot(pred), one_hot(truth)
    dice = monai_metrics.compute_dice(y_pred, y, include_background=True)[0].numpy()
    iou = monai_metrics.compute_iou(y_pred, y, include_background=True)[0].numpy()
    hd95 = monai_metrics.compute_hausdorff_distance(y_pred, y, percentile=95, spacing=spacing)[0].numpy()
    np.testing.assert_allclose([c["dice"] for c in result["classes"]], dice, rtol=1e-6)
    np.testing.assert_allclose([c["iou"] for c in result["classes"]], iou, rtol=1e-6)
    np.testing.assert_allclose([c["hd95_mm"] for c in result["classes"][1:]], hd95, rtol=1e-5)
    assert result["classes"][0]["hd95_mm"] is None


def test_evaluate_slabs_volumes_precision_recall():
    truth, pred = _blobs(2), _blobs(3)
    whole = evaluate_labels(pred, truth, (1.0, 1.0, 2.0), slab=100)
    thin = evaluate_labels(pred, truth, (1.0, 1.0, 2.0), slab=1)
    assert whole == thin
    for c, entry in enumerate(whole["classes"]):
        tp = int(((pred == c) & (truth == c)).sum())
        assert entry["precision"] == tp / (pred == c).sum() and entry["recall"] == tp / (truth == c).sum()
        assert (
            entry["voxels_pred"] == (pred == c).sum() and entry["volume_mm3_truth"] == 2 * (truth == c).sum()
        )


def test_hd95_empty_and_by_hand():
    truth = np.zeros((5, 9, 9), np.uint8)
    truth[2, 4, 2] = 1
    pred = np.zeros_like(truth)
    pred[2, 4, 6] = 1
    result = evaluate_labels(pred, truth, (1.0, 1.0, 0.5), n_classes=3)
    assert result["classes"][1]["hd95_mm"] == 2.0  # four voxels apart along x at 0.5 mm
    assert np.isnan(result["classes"][2]["hd95_mm"]) and np.isnan(result["classes"][2]["dice"])
    pred[:] = 0
    assert evaluate_labels(pred, truth, n_classes=2)["classes"][1]["hd95_mm"] == float("inf")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        evaluate_labels(truth * 2, truth, n_classes=2)


def test_float_label_files_accepted_when_whole():
    truth, pred = _blobs(4), _blobs(5)
    as_float = evaluate_labels(pred.astype(np.float32), truth.astype(np.float64))
    assert as_float == evaluate_labels(pred, truth)
    with pytest.raises(ValueError, match="prediction labels must be whole numbers"):
        evaluate_labels(pred + np.float32(0.5), truth)


def test_real_fly_labels_hd95_matches_monai(real_data):
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is not installed")
    from scipy import ndimage

    from meunet.io import read_volume

    truth = read_volume(real_data / "qim3d" / "fly_150x256x256_silver3.tif").array[50:90, 40:200, 40:200]
    pred = ndimage.median_filter(truth, 5)  # a plausible, different segmentation of the same fly
    spacing = (1.0, 0.7, 0.7)
    result = evaluate_labels(pred, truth, spacing, slab=16)

    def one_hot(labels):
        return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(3, 0, 1, 2)[None]

    hd95 = monai_metrics.compute_hausdorff_distance(
        one_hot(pred), one_hot(truth), percentile=95, spacing=spacing
    )
    np.testing.assert_allclose([c["hd95_mm"] for c in result["classes"][1:]], hd95[0].numpy(), rtol=1e-5)
    assert all(0 < c["dice"] < 1 for c in result["classes"])
