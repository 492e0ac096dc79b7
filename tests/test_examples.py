"""The ``>>>`` examples in the docstrings of the main public functions, run as doctests on tiny data."""

import doctest

import numpy as np
import pytest

import meunet.precision
from meunet.data.patches import sample_stride
from meunet.infer import Predictor, PredictSettings, SlidingWindow, choose_window, predict, window_candidates
from meunet.io import Volume, check_outputs, read_volume, write_volume
from meunet.metrics import evaluate
from meunet.models import context_side, stage1_fill
from meunet.synth import generate_dataset
from meunet.train import train
from meunet.train.loop import learning_rate, steps_to_fill
from meunet.train.plan import flat_shares, threshold_dice
from test_infer_predict import _image, _model_dir
from test_infer_window import _one_torch_thread  # noqa: F401 (autouse fixture: one torch thread here too)

EXAMPLES = [
    read_volume,
    generate_dataset,
    train,
    PredictSettings,
    SlidingWindow,
    Predictor,
    predict,
    choose_window,
    window_candidates,
    evaluate,
    context_side,
    stage1_fill,
    check_outputs,
    sample_stride,
    flat_shares,
    threshold_dice,
    learning_rate,
    steps_to_fill,
    meunet.precision,
]


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> dict:
    """What the examples refer to: ``tmp`` (a folder), ``image_path`` (a 40 x 20 x 24 uint8 scan),
    ``model_dir`` (a small random model), ``labels_path`` (labels of three classes), ``dataset`` (a
    synthetic data set of three flies)."""
    tmp = tmp_path_factory.mktemp("examples")
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:4], labels[5:] = 1, 2
    write_volume(tmp / "labels.nii.gz", Volume(labels))
    return {
        "tmp": tmp,
        "image_path": _image(tmp / "image.nii.gz"),
        "model_dir": _model_dir(tmp / "model"),
        "labels_path": tmp / "labels.nii.gz",
        "dataset": generate_dataset(tmp / "data", count=3, shape=(32, 32, 32)),
        "read_volume": read_volume,
    }


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda obj: obj.__name__)
def test_docstring_examples_run(obj, names):
    module = obj if hasattr(obj, "__file__") else __import__(obj.__module__, fromlist=["_"])
    tests = doctest.DocTestFinder(recurse=obj is module).find(obj, globs=dict(vars(module)), extraglobs=names)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.tries > 0, f"{obj.__name__} has no >>> example"
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples of {obj.__name__} failed"
