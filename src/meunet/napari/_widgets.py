"""The dock widgets: "Segment with meunet" and "Evaluate labels"."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Table,
)
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from superqt.utils import create_worker  # napari's own would also report a cancel as an error

from meunet.errors import InputError
from meunet.napari._layers import geometry, labels_kwargs, layer_class_names, level0
from meunet.napari._segment import segment
from meunet.precision import PRECISIONS

COLUMNS = ["class", "Dice", "IoU", "HD95 mm"]


class Cancelled(Exception):
    """Raised inside the worker when the user presses Cancel."""


def _devices() -> list[str]:
    """cpu, every CUDA device, and mps where torch has them."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def _layer_choice(viewer, kind, label: str) -> ComboBox:
    """A combo box of the viewer's layers of type ``kind``, kept up to date as layers come and go."""
    box = ComboBox(label=label, choices=lambda _: [lay for lay in viewer.layers if isinstance(lay, kind)])
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
        event.connect(lambda _: box.reset_choices())
    return box


class SegmentWidget(Container):
    """Choose a model directory and an image layer; predict in a thread worker, with a progress bar and a
    Cancel button; the labels become a Labels layer (model class names and meunet's colours), and are
    also written to "save to" when a path is given (any format meunet writes, chosen by suffix)."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model_dir = FileEdit(label="model directory", mode="d")
        self.image = _layer_choice(napari_viewer, Image, "image")
        self.device = ComboBox(label="device", choices=_devices(), value="cpu")
        self.precision = ComboBox(label="precision", choices=PRECISIONS, value="auto")
        self.overlap = FloatSpinBox(label="overlap", value=0.5, min=0.0, max=0.9, step=0.05)
        self.skip_empty = CheckBox(text="skip empty (all-air) windows", value=False)
        self.postprocess = CheckBox(text="post-processing chosen in training", value=True)
        self.save_to = FileEdit(label="save to", mode="w", nullable=True, value=None)
        self.run = PushButton(text="Segment")
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="windows", min=0, max=100, value=0)
        self.status = Label(value="")
        self.extend([
            self.model_dir, self.image, self.device, self.precision, self.overlap, self.skip_empty,
            self.postprocess, self.save_to, self.run, self.cancel, self.progress, self.status,
        ])  # fmt: skip
        self.run.changed.connect(self.start)
        self.cancel.changed.connect(self._cancel_requested)
        self.worker = None
        self._done = (0, 1)  # windows visited, total: written by the worker, shown by the timer
        self._cancel = threading.Event()
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._show_progress)

    def start(self) -> None:
        """Start the prediction on the chosen image layer (one at a time)."""
        layer = self.image.value
        if layer is None or self.worker is not None:
            return
        self._cancel.clear()
        self._done = (0, 1)
        settings = {
            "overlap": self.overlap.value, "device": self.device.value, "precision": self.precision.value,
            "skip_empty": self.skip_empty.value, "postprocess": self.postprocess.value,
        }  # fmt: skip
        self.worker = create_worker(
            self._work, Path(self.model_dir.value), layer, settings, self.save_to.value, _start_thread=False,
            _connect={"returned": self._add_result, "errored": self._failed, "finished": self._finished},
        )  # fmt: skip
        self.run.enabled, self.cancel.enabled = False, True
        self.status.value = f"segmenting {layer.name} ..."
        self._timer.start()
        self.worker.start()

    def _work(self, model_dir: Path, layer, settings: dict, save_to: Path | None):
        """In the worker thread: segment, and write the labels to ``save_to`` if given."""
        from meunet.io import Volume, write_volume

        def on_window(done: int, total: int) -> None:
            self._done = (done, total)
            if self._cancel.is_set():
                raise Cancelled

        labels, classes = segment(model_dir, level0(layer), on_window=on_window, **settings)
        if save_to is not None:
            write_volume(save_to, Volume(labels, **geometry(layer)))
        return layer, labels, classes

    def _cancel_requested(self) -> None:
        self._cancel.set()
        self.status.value = "cancelling ..."

    def _show_progress(self) -> None:
        done, total = self._done
        self.progress.value = round(100 * done / max(total, 1))

    def _add_result(self, result) -> None:
        layer, labels, classes = result
        self.viewer.add_labels(
            labels, name=f"{layer.name} meunet", scale=layer.scale, translate=layer.translate,
            **labels_kwargs(classes),
        )  # fmt: skip
        self._show_progress()
        self.status.value = f"done: {layer.name} meunet"

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled"
        elif isinstance(exc, InputError):
            self.status.value = f"error: {exc.path}: {exc.message}"
        else:
            self.status.value = f"error: {exc!r}"
            show_error(f"meunet: segmentation failed: {exc!r}")

    def _finished(self) -> None:
        self._timer.stop()
        self.worker = None
        self.run.enabled, self.cancel.enabled = True, False


class EvaluateWidget(Container):
    """Dice, IoU and HD95 (mm) per class of a Labels layer against another (:mod:`meunet.metrics`), in a
    table; class names from the truth layer, spacing from its scale. Runs in a thread worker."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.prediction = _layer_choice(napari_viewer, Labels, "prediction")
        self.truth = _layer_choice(napari_viewer, Labels, "truth")
        self.run = PushButton(text="Evaluate")
        self.status = Label(value="")
        self.table = Table(value={"data": [], "index": [], "columns": COLUMNS})
        self.extend([self.prediction, self.truth, self.run, self.status, self.table])
        self.run.changed.connect(self.start)
        self.worker = None

    def start(self) -> None:
        """Evaluate the chosen prediction against the chosen truth."""
        pred, truth = self.prediction.value, self.truth.value
        if pred is None or truth is None or self.worker is not None:
            return
        self.worker = create_worker(
            self._work, pred, truth, _start_thread=False,
            _connect={
                "returned": self._show,
                "errored": lambda exc: setattr(self.status, "value", f"error: {exc}"),
                "finished": lambda: setattr(self, "worker", None),
            },
        )  # fmt: skip
        self.status.value = f"evaluating {pred.name} against {truth.name} ..."
        self.worker.start()

    @staticmethod
    def _work(pred, truth) -> list[list]:
        from meunet.metrics import evaluate_labels

        names = layer_class_names(truth)
        result = evaluate_labels(level0(pred), level0(truth), geometry(truth)["spacing"])
        return [
            [
                names[c["label"]] if c["label"] < len(names) else f"label {c['label']}",
                round(c["dice"], 4), round(c["iou"], 4),
                "-" if c["hd95_mm"] is None else round(c["hd95_mm"], 3),
            ]
            for c in result["classes"]
        ]  # fmt: skip

    def _show(self, rows: list[list]) -> None:
        self.table.value = {"data": rows, "index": list(range(len(rows))), "columns": COLUMNS}
        self.status.value = "done"
