import numpy as np

from meunet.metrics import confusion_matrix, dice_from_confusion, iou_from_confusion


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
