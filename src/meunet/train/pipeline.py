"""``train(config)``: stage 1, stage 2 or both, into one model directory."""

from __future__ import annotations

import platform
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from meunet import __version__
from meunet.data.normalization import Normalization
from meunet.data.patches import PatchDataset
from meunet.errors import InputError
from meunet.infer import SlidingWindow
from meunet.models import Cascade, MeUNet, UNet3D, load_model_dir, save_model_dir
from meunet.train.config import TrainConfig
from meunet.train.data import TrainingData, open_array, prepare_data, resolve_split
from meunet.train.inference import (
    cache_stage1_output,
    file_digest,
    image_input,
    probability_input,
    validation_dice,
)
from meunet.train.log import TrainLog
from meunet.train.loop import Stage, augment_batch, fit_stage, local_losses, stage1_losses, stage2_losses
from meunet.train.loss import class_weights

STAGE1_FILES = ("model.json", "stage1.pt", "checkpoint_stage1.pt", "train_log.csv")
STAGE2_FILES = ("stage2.pt", "checkpoint_stage2.pt")
CACHE_DIR = "stage1_cache"
OVERLAP = 0.5


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA, else MPS, else CPU; a named accelerator must be present.

    Raises:
        InputError: the requested device is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device.type] or (
        device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    ):
        raise InputError("device", f"{name} is not available on this machine")
    return device


def _check_output(out: Path, stages: list[int], resume: bool, force: bool) -> None:
    """Refuse to overwrite a run without ``force``, to resume nothing, or to train stage 2 without stage 1."""
    if resume and force:
        raise InputError(out, "--resume and --force exclude each other")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    if resume:
        if not (out / f"checkpoint_stage{stages[0]}.pt").exists():
            raise InputError(out, f"nothing to resume: no checkpoint_stage{stages[0]}.pt")
        return
    if stages == [2] and not ((out / "model.json").exists() and (out / "stage1.pt").exists()):
        raise InputError(out, "no trained stage 1 here (model.json, stage1.pt): train stage 1 first")
    ours = STAGE2_FILES if stages == [2] else STAGE1_FILES + STAGE2_FILES
    if not force and any((out / name).exists() for name in ours):
        raise InputError(out, "holds a training run (use --resume to continue it, --force to start over)")


def _remove_outputs(out: Path, stages: list[int]) -> None:
    for name in STAGE2_FILES if stages == [2] else (*STAGE1_FILES, *STAGE2_FILES, "curves.png"):
        (out / name).unlink(missing_ok=True)
    if stages != [2]:
        shutil.rmtree(out / CACHE_DIR, ignore_errors=True)


def _meta(config: TrainConfig, data: TrainingData, normalization: dict[str, float]) -> dict[str, Any]:
    """``model.json`` content besides the architectures (which :func:`save_model_dir` adds)."""
    return {
        "classes": data.split.classes,
        "normalization": normalization,
        "patch": list(config.patch.size),
        "context_scale": config.patch.context_scale,
        "window": list(config.patch.context),
        "spacing": list(data.spacing),
        "train_config": config.model_dump(mode="json"),
        "versions": {
            "meunet": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def _engine(config: TrainConfig, device: torch.device) -> SlidingWindow:
    """Sliding-window settings for validation and the stage-1 cache: the context-sized inference window."""
    return SlidingWindow(config.patch.context, OVERLAP, device=str(device), precision=config.precision)


def _augment(config: TrainConfig, data: TrainingData):
    image_fill = float(data.normalization.apply(np.zeros(1))[0])
    return partial(
        augment_batch,
        augmentation=config.augmentation,
        image_fill=image_fill,
        perturb=config.stage2.perturb_probability,
    )


def _fit(number, net, config, data, out, device, log, resume, save_best, caches=None) -> int:
    """Train stage ``number`` (``caches``: stage-1 probability Zarr paths per split, stage 2 only); returns
    the number of steps taken."""
    n_classes, norm = len(data.split.classes), data.normalization
    meunet_stage1 = caches is None and isinstance(net, MeUNet)
    dataset = PatchDataset(
        data.openers("train", "image"),
        data.openers("train", "label"),
        data.index,
        config.patch.size,
        config.patch.context if meunet_stage1 else None,
        norm,
        config.seed,
        None if caches is None else [partial(zarr.open_array, str(p), mode="r") for p in caches["train"]],
        config.patch.foreground_oversample,
    )
    engine = _engine(config, device)

    def validate() -> np.ndarray:
        net.eval()
        volumes = []
        for i, pair in enumerate(data.split.validation):
            inputs = [image_input(open_array(pair.image), norm)]
            if caches is not None:
                inputs.append(probability_input(zarr.open_array(str(caches["validation"][i]), mode="r")))
            volumes.append((inputs, open_array(pair.label)))
        return validation_dice(net, volumes, n_classes, engine)

    weights = class_weights(data.index.class_counts).to(device)
    kind = stage1_losses if meunet_stage1 else local_losses if caches is None else stage2_losses
    losses = partial(kind, weights=weights)
    stage = Stage(number, net, dataset, losses, validate, save_best)
    checkpoint = out / f"checkpoint_stage{number}.pt"
    return fit_stage(stage, config, checkpoint, log, device, _augment(config, data), resume)


def _train_stage1(config, data, meta, out, device, log, resume) -> bool:
    """Train stage 1 (a meU-net, or a plain U-net on local patches); returns whether any step was taken in
    this call."""
    torch.manual_seed(config.seed)
    m = config.model
    architecture = MeUNet if m.stage1 == "meunet" else UNet3D
    net = architecture(
        1, len(data.split.classes), widths=m.widths, norm=m.norm, checkpointing=m.checkpointing
    )
    net = net.to(device)
    save_best = partial(save_model_dir, out, meta, net, None, force=True)
    return _fit(1, net, config, data, out, device, log, resume, save_best) > 0


def _train_stage2(config, data, meta, out, device, log, resume) -> None:
    """Cache stage-1 probabilities of every volume (reused when still valid), then train stage 2."""
    stage1 = load_model_dir(out, device).stage1
    torch.manual_seed(config.seed)
    m, n_classes = config.model, len(data.split.classes)
    in_channels = 1 + (n_classes if m.fusion == "pre" else 0)
    unet = UNet3D(in_channels, n_classes, widths=m.widths, norm=m.norm, checkpointing=m.checkpointing)
    net = Cascade(stage1, unet, m.fusion, "probs").to(device).eval()
    engine = _engine(config, device)
    digest = file_digest(out / "stage1.pt")
    caches: dict[str, list[Path]] = {"train": [], "validation": []}
    (out / CACHE_DIR).mkdir(exist_ok=True)
    for which, paths in caches.items():
        for i, pair in enumerate(getattr(data.split, which)):
            paths.append(out / CACHE_DIR / f"{which}_{i}.zarr")
            key = {
                "stage1": digest,
                "image": str(pair.image),
                "window": list(engine.window),
                "overlap": OVERLAP,
            }
            cache_stage1_output(net, open_array(pair.image), data.normalization, engine, paths[-1], key)
    save_best = partial(save_model_dir, out, meta, stage1, net, force=True)
    _fit(2, net, config, data, out, device, log, resume, save_best, caches)


def train(config: TrainConfig, resume: bool = False, force: bool = False) -> Path:
    """Train the stages ``config.stages`` into the model directory ``config.output``.

    All volumes are checked before anything is written. Stage 1 (meU-net) trains on local and context
    patches; stage 2 trains a U-net on local patches with the frozen stage 1's cached probabilities (post- or
    pre-concatenation). The model directory holds ``model.json``, ``stage1.pt``, ``stage2.pt`` (best
    weights by mean foreground validation Dice), ``train_log.csv``, ``curves.png``, the resumable
    ``checkpoint_stage*.pt`` and the ``stage1_cache/`` Zarr arrays.

    Args:
        config: the validated configuration (see :func:`meunet.train.load_config`).
        resume: continue from the checkpoints in ``config.output``. A stage 2 whose stage 1 was trained
            further in this call starts afresh.
        force: start over in an existing model directory, deleting its training files (only those).

    Returns:
        The model directory.

    Raises:
        InputError: a bad device, output state, data set or volume (one line naming the problem).
    """
    out = config.output
    stages = {"1": [1], "2": [2], "both": [1, 2]}[config.stages]
    device = resolve_device(config.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed patch and window sizes: pick fast kernels
    _check_output(out, stages, resume, force)
    data = prepare_data(config, resolve_split(config))
    previous = load_model_dir(out) if stages == [2] else None
    if previous is not None:
        if len(previous.classes) != len(data.split.classes):
            raise InputError(
                out / "model.json",
                f"stage 1 has {len(previous.classes)} classes, the data {len(data.split.classes)}",
            )
        normalization = Normalization.from_dict(previous.meta["normalization"])
        data = TrainingData(data.split, data.index, normalization, data.spacing)
    meta = _meta(config, data, data.normalization.to_dict())
    out.mkdir(parents=True, exist_ok=True)
    if force:
        _remove_outputs(out, stages)
        if previous is not None:  # back to a stage-1 model directory
            save_model_dir(out, meta, previous.stage1, None, force=True)
    log = TrainLog(out / "train_log.csv", data.split.classes)
    stage1_changed = 1 in stages and _train_stage1(config, data, meta, out, device, log, resume)
    if 2 in stages:
        _train_stage2(config, data, meta, out, device, log, resume and not stage1_changed)
    log.plot(out / "curves.png")
    return out
