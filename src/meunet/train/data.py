"""The training data: the train/validation split, volume checks, the sampling index and the normalisation.

Every volume is read once here, slab by slab (labels: value check and per-patch class counts; images: NaN
check and an intensity sample), before anything is written; training then reads patches lazily.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from meunet.data.normalization import Normalization
from meunet.data.patches import scan_image
from meunet.data.sampling import PatchIndex, build_index, check_labels
from meunet.errors import InputError
from meunet.io import iter_slabs, open_volume
from meunet.train.config import TrainConfig, VolumePair, check_class_names


@dataclass(frozen=True)
class Split:
    """Training and validation volumes and the class names (index = label value)."""

    train: list[VolumePair]
    validation: list[VolumePair]
    classes: list[str]


def _dataset_volumes(path: Path) -> tuple[list[VolumePair], list[str]]:
    """Image/label pairs and class names of a synthetic ``dataset.json`` (paths relative to it)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("volumes"), list) or not meta["volumes"]:
        raise InputError(path, "not a meunet dataset.json: it needs a non-empty list 'volumes'")
    pairs = []
    for i, volume in enumerate(meta["volumes"]):
        if not (isinstance(volume, dict) and all(isinstance(volume.get(k), str) for k in ("image", "label"))):
            raise InputError(path, f"volumes[{i}] needs the paths 'image' and 'label'")
        pairs.append(VolumePair(image=path.parent / volume["image"], label=path.parent / volume["label"]))
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise InputError(path, "'classes' must list two or more class names")
    try:
        return pairs, check_class_names(classes)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None


def resolve_split(config: TrainConfig) -> Split:
    """The split and class names: from ``data.dataset`` (its last ``validation_count`` volumes validate) or
    from the ``data.train`` / ``data.validation`` pairs; ``model.classes`` overrides the dataset's names.

    Raises:
        InputError: unreadable dataset.json, too few volumes, or no class names.
    """
    data = config.data
    classes = config.model.classes
    if data.dataset is None:
        if classes is None:
            raise InputError("model.classes", "list the class names when data are image/label pairs")
        return Split(list(data.train), list(data.validation), list(classes))
    pairs, dataset_classes = _dataset_volumes(data.dataset)
    if len(pairs) <= data.validation_count:
        raise InputError(data.dataset, f"{len(pairs)} volumes leave none for training after validation_count")
    cut = len(pairs) - data.validation_count
    return Split(pairs[:cut], pairs[cut:], list(classes or dataset_classes))


def open_array(path: Path):
    """The lazy (Z, Y, X) array of a volume file (picklable as ``partial(open_array, path)``)."""
    return open_volume(path).array


@dataclass(frozen=True)
class TrainingData:
    """Checked volumes, the sampling index over the training volumes, and the fitted normalisation.

    Attributes:
        split: the volumes and class names.
        index: kept patches of the training volumes.
        normalization: fitted on a strided sample of the training images.
        spacing: (z, y, x) mm of the first training volume.
    """

    split: Split
    index: PatchIndex
    normalization: Normalization
    spacing: tuple[float, float, float]

    def openers(self, which: str, kind: str) -> list[partial]:
        """Picklable callables returning the lazy arrays of ``which`` ("train"/"validation") ``kind``
        ("image"/"label") volumes."""
        return [partial(open_array, getattr(p, kind)) for p in getattr(self.split, which)]


def check_pair(pair: VolumePair):
    """Open an image/label pair lazily; the label must have the image's shape (else InputError)."""
    image, label = open_volume(pair.image), open_volume(pair.label)
    if tuple(image.array.shape) != tuple(label.array.shape):
        raise InputError(
            pair.label,
            f"label shape {tuple(label.array.shape)} differs from image shape {tuple(image.array.shape)}",
        )
    return image, label


def prepare_data(config: TrainConfig, split: Split) -> TrainingData:
    """Open and check every volume, build the sampling index and fit the normalisation.

    Raises:
        InputError: a missing or unreadable volume, label shape differing from its image, label values
            outside the classes, NaN or infinite intensities, training images of one grey value, or no
            training patch kept.
    """
    n_classes, patch = len(split.classes), config.patch
    train = [check_pair(p) for p in split.train]
    validation = [check_pair(p) for p in split.validation]
    index = build_index(
        [label.array for _, label in train],
        [p.label for p in split.train],
        n_classes,
        patch.size,
        patch.step,
        patch.background_threshold,
        patch.background_keep,
        config.seed,
    )
    for (_, label), pair in zip(validation, split.validation, strict=True):
        for _, slab in iter_slabs(label.array):
            check_labels(slab, n_classes, pair.label)
    per_volume = 2_000_000 // len(train) + 1
    samples = [
        scan_image(image.array, p.image, per_volume) for (image, _), p in zip(train, split.train, strict=True)
    ]
    for (image, _), pair in zip(validation, split.validation, strict=True):
        scan_image(image.array, pair.image, 1)
    normalization = Normalization.fit(samples)
    if normalization.clip_low == normalization.clip_high:
        where = split.train[0].image if len(train) == 1 else "data.train"
        value = f"{normalization.mean:g}"
        raise InputError(where, f"99 % of the training voxels are {value}: there is nothing to learn from")
    return TrainingData(split, index, normalization, train[0][0].spacing)
