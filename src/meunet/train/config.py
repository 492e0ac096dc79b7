"""The training configuration: a YAML file validated by pydantic.

Every key is documented in ``docs/config.md``. Relative paths are resolved against the directory of the YAML
file. A bad key ends in one line naming it (``error: CONFIG.yaml: model.widths: ...``) and exit status 2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from meunet.errors import InputError
from meunet.models.meunet import context_side
from meunet.precision import check_device

MAX_DURATION = 366 * 86400
"""The longest time budget, in seconds (a year): more is a typing mistake."""


def parse_duration(text: str | float | int) -> float:
    """Seconds of ``"10m"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` or a number of seconds.

    >>> parse_duration("1h30m"), parse_duration("90s"), parse_duration(20)
    (5400.0, 90.0, 20.0)

    Raises:
        ValueError: not a positive duration of at most a year.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        number = r"(\d+(?:\.\d+)?)"
        parts = re.fullmatch(rf"\s*(?:{number}h)?\s*(?:{number}m)?\s*(?:{number}s?)?\s*", str(text))
        if not parts or not any(parts.groups()):
            raise ValueError(f"not a duration like 10m, 1h30m or 90s: {text!r}")
        seconds = sum(float(v) * u for v, u in zip(parts.groups(), (3600, 60, 1), strict=True) if v)
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"a duration must be positive and at most a year, not {text!r}")
    return seconds


def _triple(value: object) -> object:
    """Accept one int for all three axes, or a (z, y, x) list."""
    return (value, value, value) if isinstance(value, int) and not isinstance(value, bool) else value


Triple = Annotated[tuple[int, int, int], BeforeValidator(_triple)]


def _resolve(path: Path | None, info: ValidationInfo) -> Path | None:
    if path == Path():  # "" and "." (pydantic makes "" a ".") would name the YAML file's own folder
        raise ValueError("an empty path or '.' names the configuration's folder: give a file or folder name")
    base = (info.context or {}).get("base_dir")
    return Path(base) / path if path is not None and base is not None and not path.is_absolute() else path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class VolumePair(_Strict):
    """One labelled volume: an image and its label map of the same shape."""

    image: Path
    label: Path

    _abs = field_validator("image", "label")(_resolve)


class DataConfig(_Strict):
    """Where the labelled volumes are: a synthetic ``dataset.json`` or explicit image/label pairs."""

    dataset: Path | None = None
    validation_count: int = Field(1, ge=1)
    train: list[VolumePair] = []
    validation: list[VolumePair] = []

    _abs = field_validator("dataset")(_resolve)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.dataset is not None and (self.train or self.validation):
            raise ValueError("give either dataset or train/validation pairs, not both")
        if self.dataset is None and not (self.train and self.validation):
            raise ValueError("give a dataset, or at least one train and one validation pair")
        return self


def check_class_names(names: list[str]) -> list[str]:
    """``names`` if each is non-empty one-line text without commas or edge spaces (they head the columns
    of train_log.csv and the tables) and none is given twice; ValueError otherwise.

    >>> check_class_names(["background", "gut", "gut"])
    Traceback (most recent call last):
    ValueError: class name 'gut' given twice
    """
    for name in names:
        if not name or not name.isprintable() or "," in name or name != name.strip():
            raise ValueError(f"class name {name!r}: need non-empty one-line text without commas")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"class name {name!r} given twice")
    return names


class ModelConfig(_Strict):
    """The networks: stage 1 is a meU-net (or, for the baselines, a plain U-net on the local patch only),
    stage 2 a U-net of the same widths joined by ``fusion``."""

    classes: list[str] | None = Field(None, min_length=2)
    stage1: Literal["meunet", "unet"] = "meunet"
    widths: list[int] = Field([16, 32, 64, 128, 128], min_length=5, max_length=5)
    norm: Literal["batch", "instance"] = "instance"
    checkpointing: bool = True
    fusion: Literal["post", "pre"] = "post"

    _names = field_validator("classes")(lambda names: names and check_class_names(names))

    @field_validator("widths")
    @classmethod
    def _positive(cls, widths: list[int]) -> list[int]:
        if min(widths) < 1:
            raise ValueError("every width must be at least 1")
        return widths


MAX_SIDE = 1024
"""The largest patch side (the paper's is 160): a training step of more would not fit any machine."""
MAX_CONTEXT_SCALE = 4.0
"""The largest context side / local side (the paper's is 1.5)."""


class PatchConfig(_Strict):
    """Local patch, context patch and the sampling grid (docs/method.md sections 2 and 4)."""

    size: Triple = (160, 160, 160)
    context_scale: float = Field(1.5, ge=1.0, le=MAX_CONTEXT_SCALE)
    grid_step: Triple | None = None
    background_threshold: float = Field(0.98, gt=0.0, le=1.0)
    background_keep: float = Field(0.05, ge=0.0, le=1.0)
    foreground_oversample: float = Field(0.33, ge=0.0, le=1.0)

    @field_validator("size")
    @classmethod
    def _even(cls, size: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 or s % 2 or s > MAX_SIDE for s in size):
            raise ValueError(f"each side must be even, from 8 to {MAX_SIDE}")
        return size

    @model_validator(mode="after")
    def _step_divides(self) -> PatchConfig:
        if self.grid_step is not None and any(
            st < 1 or sz % st for sz, st in zip(self.size, self.grid_step, strict=True)
        ):
            raise ValueError(f"grid_step {list(self.grid_step)} must divide the patch size {list(self.size)}")
        return self

    @property
    def step(self) -> tuple[int, int, int]:
        """The grid step, half the patch side (50 % overlap) unless set."""
        return self.grid_step or tuple(s // 2 for s in self.size)  # type: ignore[return-value]

    @property
    def context(self) -> tuple[int, int, int]:
        """Context side: about ``context_scale`` times the patch, with the same centre (even margins)."""
        return tuple(context_side(s, self.context_scale) for s in self.size)  # type: ignore


class TrainingConfig(_Strict):
    """Optimiser, limits, validation schedule and the data loader."""

    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(9e-4, gt=0, le=1)  # Adam's steps are about the learning rate
    max_epochs: float = Field(400, gt=0)
    max_iterations: int | None = Field(None, ge=1)
    validate_every: int | None = Field(None, ge=1)
    patience: int = Field(30, ge=1)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup: float = Field(0.02, ge=0, lt=1)
    workers: int = Field(0, ge=0)
    progress: bool = True
    time_budget: Annotated[float, BeforeValidator(parse_duration)] | None = None


class AugmentationConfig(_Strict):
    """Random affine (rotation and isotropic scale about the patch centre) and flips, on the device."""

    affine_probability: float = Field(0.2, ge=0, le=1)
    rotation: float = Field(math.pi / 2, ge=0, le=math.pi)
    scale: float = Field(0.1, ge=0, lt=1)
    flips: bool = True
    intensity_probability: float = Field(0.15, ge=0, le=0.5)
    independent_context: bool = False


class Stage2Config(_Strict):
    """Stage-2 specifics: out-of-fold stage-1 output and its perturbation."""

    out_of_fold: bool = True
    folds: int = Field(2, ge=2, le=10)
    morphology_probability: float = Field(0.4, ge=0, le=1)
    max_radius: int = Field(8, ge=1, le=32)
    removal_probability: float = Field(0.2, ge=0, le=1)
    keep_if_better: bool = True


class TrainConfig(_Strict):
    """The whole ``meunet train`` configuration."""

    output: Path
    stages: Literal["1", "2", "both"] = "both"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what numpy's and torch's generators all take
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    patch: PatchConfig = PatchConfig()
    training: TrainingConfig = TrainingConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    stage2: Stage2Config = Stage2Config()

    _abs = field_validator("output")(_resolve)

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _norm_fits_patch(self) -> TrainConfig:
        if self.model.norm == "instance" and min(self.patch.size) < 32:
            raise ValueError(
                "patch.size: instance norm needs sides of at least 32 (the bottleneck is 1/16 of the patch); "
                "use a larger patch or model.norm: batch"
            )
        bottleneck = math.prod(max(1, side // 16) for side in self.patch.size)
        if self.model.norm == "batch" and self.training.batch_size * bottleneck < 2:
            raise ValueError(
                "training.batch_size: batch norm of one patch of one voxel at the bottleneck (1/16 of "
                f"patch.size {tuple(self.patch.size)}) has no variance: use batch_size >= 2 or sides >= 32"
            )
        return self


def parse_config(values: dict, source: str | Path, base_dir: str | Path | None = None) -> TrainConfig:
    """Validate a configuration mapping.

    Args:
        values: the parsed YAML mapping.
        source: what to name in an error (the YAML file).
        base_dir: directory against which relative paths resolve (None: leave them as given).

    Raises:
        InputError: ``(source, "key.path: problem")`` for the first invalid key.
    """
    try:
        return TrainConfig.model_validate(values, context={"base_dir": base_dir})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise InputError(source, f"{where + ': ' if where else ''}{message}{more}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that run code), refusing a key given twice in one mapping (PyYAML
    keeps the last silently, so a forgotten earlier line would win or lose unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own mapping refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML configuration; relative paths resolve against the file's directory.

    Raises:
        InputError: missing or unparsable file, or an invalid key (named in the message).
    """
    path = Path(path)
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeyLoader)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start}): a YAML configuration is") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
        raise InputError(path, f"not valid YAML: {getattr(exc, 'problem', None) or exc}{at}") from None
    except RecursionError:
        raise InputError(path, "not valid YAML: nested too deeply for a configuration") from None
    if not isinstance(values, dict):
        raise InputError(path, "expected a mapping of keys at the top level")
    try:
        return parse_config(values, path, path.resolve().parent)
    except RecursionError:
        raise InputError(path, "a value is nested too deeply for a configuration") from None


def stage_mapping(mapping: dict, stage: int, iterations: int, validations: int) -> dict:
    """``mapping`` for training only ``stage`` (1, or 2 on top of the stage 1 already in the output) for
    ``iterations`` steps, validated ``validations`` times (evenly spaced, the last at the end)."""
    every = max(1, iterations // validations)
    training = {**mapping["training"], "max_iterations": iterations, "validate_every": every}
    return {**mapping, "stages": str(stage), "training": training}
