"""``train(config)``: stage 1, stage 2 or both, into one model directory."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from meunet import __version__, ddp
from meunet.data.normalization import Normalization
from meunet.data.patches import PatchDataset
from meunet.data.sampling import PatchIndex, fold_regions, without_regions
from meunet.errors import InputError
from meunet.infer import SlidingWindow, image_input, stage1_input
from meunet.infer.postprocess import choose_rules
from meunet.io import output_lock, write_json
from meunet.models import Cascade, MeUNet, UNet3D, load_model_dir, save_model_dir
from meunet.precision import resolve_device
from meunet.train.checkpoint import load_checkpoint, save_checkpoint
from meunet.train.config import TrainConfig
from meunet.train.data import TrainingData, open_array, prepare_data, resolve_split
from meunet.train.inference import (
    cache_stage1_output,
    file_digest,
    validation_dice,
    validation_labels,
)
from meunet.train.log import TrainLog
from meunet.train.loop import (
    Stage,
    StageTrainer,
    augment_batch,
    local_losses,
    stage1_losses,
    stage2_losses,
)
from meunet.train.loss import class_weights
from meunet.train.plan import (
    BUDGET_USE,
    PLANNED_KEYS,
    Deadline,
    Plan,
    apply_plan,
    calibrate,
    fingerprint,
    format_plan,
    plan_run,
    probe_device,
    user_keys,
)

STAGE1_FILES = ("model.json", "stage1.pt", "checkpoint_stage1.pt", "train_log.csv")
STAGE2_FILES = ("stage2.pt", "stage2_rejected.pt", "checkpoint_stage2.pt")
CACHE_DIR = "stage1_cache"
OVERLAP = 0.5


def _say(message: str) -> None:
    """A ``meunet train:`` line on stderr, from rank 0 alone under torchrun."""
    if ddp.is_main():
        print(f"meunet train: {message}", file=sys.stderr)


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
    return SlidingWindow(
        config.patch.context, overlap=OVERLAP, device=str(device), precision=config.precision
    )


def _augment(config: TrainConfig, data: TrainingData):
    image_fill = float(data.normalization.apply(np.zeros(1))[0])
    return partial(
        augment_batch,
        augmentation=config.augmentation,
        image_fill=image_fill,
        perturb=config.stage2,
    )


@dataclass(frozen=True)
class _Run:
    """What the phases of one training command share.

    Attributes:
        config: the configuration, planned.
        data: the training data, checked.
        meta: what ``model.json`` holds besides the architectures.
        out: the model directory.
        device: where to train.
        log: the model directory's training log.
        resume: continue from the checkpoints there.
        clock: the deadline of a time-budgeted run, shared out between its phases; None without a budget.
    """

    config: TrainConfig
    data: TrainingData
    meta: dict[str, Any]
    out: Path
    device: torch.device
    log: TrainLog
    resume: bool
    clock: Deadline | None


def _fit(
    run: _Run,
    phase: str,
    net: torch.nn.Module,
    checkpoint: Path,
    save_best: Callable[[], None],
    *,
    config: TrainConfig | None = None,
    log: TrainLog | None = None,
    caches: dict[str, list[Path]] | None = None,
    index: PatchIndex | None = None,
) -> int:
    """Train ``net`` as the phase ``phase`` (``stage 1``, ``fold F`` or ``stage 2``: its share of
    ``run.clock``) with ``config`` and ``log`` (default: the run's); ``caches``: stage-1 probability Zarr
    paths per split (stage 2 only); ``index``: the patches to train on (default all of the data's). Returns
    the number of steps taken."""
    config, log, data, device = config or run.config, log or run.log, run.data, run.device
    number = 2 if phase == "stage 2" else 1
    clock = None
    if run.clock is not None:
        config, clock = run.clock.start(phase, config)
    n_classes, norm = len(data.split.classes), data.normalization
    index = data.index if index is None else index
    meunet_stage1 = caches is None and isinstance(net, MeUNet)
    dataset = PatchDataset(
        data.openers("train", "image"),
        data.openers("train", "label"),
        index,
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
                inputs.append(stage1_input(zarr.open_array(str(caches["validation"][i]), mode="r")))
            volumes.append((inputs, open_array(pair.label)))
        return validation_dice(net, volumes, n_classes, engine)

    weights = class_weights(index.class_counts).to(device)
    kind = stage1_losses if meunet_stage1 else local_losses if caches is None else stage2_losses
    across = ddp.sum_over_ranks if ddp.world_size() > 1 else None
    losses = partial(kind, weights=weights, across=across)
    stage = Stage(number, net, dataset, losses, validate, save_best)
    augment = _augment(config, data)
    trainer = StageTrainer(stage, config, checkpoint, log, device, augment)
    return trainer.run(run.resume, clock)


def _stage1_net(config: TrainConfig, n_classes: int, device: torch.device, seed: int) -> torch.nn.Module:
    """A freshly initialised stage-1 network (meU-net, or the plain U-net baseline)."""
    torch.manual_seed(seed)
    m = config.model
    architecture = MeUNet if m.stage1 == "meunet" else UNet3D
    net = architecture(1, n_classes, widths=m.widths, norm=m.norm, checkpointing=m.checkpointing)
    return net.to(device)


def _train_stage1(run: _Run) -> bool:
    """Train stage 1 (a meU-net, or a plain U-net on local patches); returns whether any step was taken in
    this call."""
    net = _stage1_net(run.config, len(run.data.split.classes), run.device, run.config.seed)
    save_best = partial(save_model_dir, run.out, run.meta, net, None, force=True)
    return _fit(run, "stage 1", net, run.out / "checkpoint_stage1.pt", save_best) > 0


def _fold_index(config: TrainConfig, data: TrainingData, regions) -> PatchIndex:
    """The training patches that read nothing of ``regions``, their context included."""
    meunet = config.model.stage1 == "meunet"
    margin = tuple(
        (c - p) // 2 if meunet else 0 for c, p in zip(config.patch.context, config.patch.size, strict=True)
    )
    return without_regions(data.index, regions, config.patch.size, margin)


def _train_fold(run: _Run, fold: int, index: PatchIndex) -> torch.nn.Module:
    """Train the stage-1 model of one fold on ``index`` (:func:`_fold_index`); returns it with its best
    validated weights, in eval mode. Its log, checkpoint and weights live in the cache folder
    (``fold<f>_log.csv``, ``fold<f>_checkpoint.pt``, ``fold<f>.pt``)."""
    folder = run.out / CACHE_DIR
    config = run.config.model_copy(update={"seed": run.config.seed + 1 + fold})
    net = _stage1_net(config, len(run.data.split.classes), run.device, config.seed)
    weights = folder / f"fold{fold}.pt"

    def save_best() -> None:
        save_checkpoint(weights, {"net": net.state_dict()})

    log = TrainLog(folder / f"fold{fold}_log.csv", run.data.split.classes)
    checkpoint = folder / f"fold{fold}_checkpoint.pt"
    _fit(run, f"fold {fold}", net, checkpoint, save_best, config=config, log=log, index=index)
    net.load_state_dict(load_checkpoint(weights)["net"])
    return net.eval()


def _cache_key(digest: str, pair, engine: SlidingWindow) -> dict:
    """What a stage-1 cache depends on: the stage-1 weights, the image and the engine settings."""
    return {"stage1": digest, "image": str(pair.image), "window": list(engine.window), "overlap": OVERLAP}


def _out_of_fold_caches(run: _Run, cascade: Cascade, engine: SlidingWindow, paths: list[Path]):
    """Write every training volume's stage-1 cache from the fold models that never saw its slices.

    Stage 1 is trained ``stage2.folds`` more times (:func:`meunet.data.sampling.fold_regions` says which
    slices each fold holds out); each fold model predicts the volumes it holds out, and only its held-out
    slices are copied into the caches. A cache whose key (fold weights, regions, image, engine) matches is
    reused. Returns what ``model.json`` records under ``out_of_fold`` (folds, regions, seconds), or None
    when some fold would have no training patch left (the caller then caches in-fold output).

    Under torchrun the folds train one after the other, each on all processes; their predictions of the
    held-out volumes are dealt out over the processes, and rank 0 copies the held-out slices.
    """
    started = time.perf_counter()
    config, data, out = run.config, run.data, run.out
    shapes = [tuple(open_array(p.image).shape) for p in data.split.train]
    folds = fold_regions(shapes, config.stage2.folds)
    indices = [_fold_index(config, data, regions) for regions in folds]
    if not all(len(index) for index in indices):
        _say(
            "stage2.out_of_fold: a fold leaves no training patch outside the region it holds "
            f"out (training volumes too small for {len(folds)} folds of {list(config.patch.size)} patches); "
            "stage 2 trains on the final stage 1's output of its training volumes instead"
        )
        return None
    nets = []
    for fold, index in enumerate(indices):
        nets.append(_train_fold(run, fold, index))
        _say(
            f"out-of-fold stage 1, fold {fold + 1}/{len(folds)} trained "
            f"({time.perf_counter() - started:.0f} s so far)"
        )
    digests = [file_digest(out / CACHE_DIR / f"fold{fold}.pt") for fold in range(len(folds))]
    scratches = [(fold, region) for fold, regions in enumerate(folds) for region in regions]
    for fold, (volume, *_) in ddp.mine(scratches):
        cascade.stage1 = nets[fold]  # the cascade predicts with this fold's stage 1 (the caller restores it)
        pair = data.split.train[volume]
        scratch = out / CACHE_DIR / f"fold{fold}_train_{volume}.zarr"
        key = _cache_key(digests[fold], pair, engine)
        cache_stage1_output(cascade, open_array(pair.image), data.normalization, engine, scratch, key)
    ddp.barrier()
    if ddp.is_main():
        _copy_held_out(scratches, shapes, len(data.split.classes), paths, out)
    ddp.barrier()
    seconds = time.perf_counter() - started
    _say(f"out-of-fold stage-1 output of {len(folds)} folds took {seconds:.0f} s")
    return {"folds": len(folds), "regions": folds, "seconds": round(seconds, 1)}


def _copy_held_out(scratches, shapes, channels: int, paths: list[Path], out: Path) -> None:
    """Assemble the training caches ``paths`` from the held-out slices of each fold's predictions."""
    targets = []
    for path, shape in zip(paths, shapes, strict=True):
        shutil.rmtree(path, ignore_errors=True)
        chunks = (channels, *(min(64, n) for n in shape))
        targets.append(zarr.create_array(path, shape=(channels, *shape), chunks=chunks, dtype=np.float16))
    for fold, (volume, axis, lo, hi) in scratches:
        source = zarr.open_array(out / CACHE_DIR / f"fold{fold}_train_{volume}.zarr", mode="r")
        for start in range(lo, hi, 64):
            box = (slice(None),) * (1 + axis) + (slice(start, min(start + 64, hi)),)
            targets[volume][box] = source[box]


def _train_stage2(run: _Run) -> None:
    """Cache stage-1 probabilities of every volume (out of fold for the training volumes unless
    ``stage2.out_of_fold`` is false; reused when still valid), then train stage 2."""
    config, data, meta, out, device = run.config, run.data, run.meta, run.out, run.device
    stage1 = load_model_dir(out, device).stage1
    torch.manual_seed(config.seed)
    m, n_classes = config.model, len(data.split.classes)
    in_channels = 1 + (n_classes if m.fusion == "pre" else 0)
    unet = UNet3D(in_channels, n_classes, widths=m.widths, norm=m.norm, checkpointing=m.checkpointing)
    net = Cascade(stage1, unet, m.fusion, "probs").to(device).eval()
    engine = _engine(config, device)
    digest = file_digest(out / "stage1.pt")
    caches: dict[str, list[Path]] = {
        which: [out / CACHE_DIR / f"{which}_{i}.zarr" for i in range(len(getattr(data.split, which)))]
        for which in ("train", "validation")
    }
    (out / CACHE_DIR).mkdir(exist_ok=True)
    record = None
    if config.stage2.out_of_fold:
        record = _out_of_fold_caches(run, net, engine, caches["train"])
        net.stage1 = stage1
        meta = meta if record is None else {**meta, "out_of_fold": record}
    pending = [
        (pair, path)
        for which, paths in caches.items()
        if which != "train" or record is None
        for pair, path in zip(getattr(data.split, which), paths, strict=True)
    ]
    for pair, path in ddp.mine(pending):  # under torchrun, the volumes are dealt out over the processes
        key = _cache_key(digest, pair, engine)
        cache_stage1_output(net, open_array(pair.image), data.normalization, engine, path, key)
    ddp.barrier()
    save_best = partial(save_model_dir, out, meta, stage1, net, force=True)
    _fit(run, "stage 2", net, out / "checkpoint_stage2.pt", save_best, caches=caches)
    if config.stage2.keep_if_better and ddp.is_main():
        _keep_the_better_stage(out, meta, stage1)


def _keep_the_better_stage(out: Path, meta: dict, stage1: torch.nn.Module) -> None:
    """Keep the cascade only if its best validation Dice beats stage 1's; otherwise the model directory
    goes back to stage 1 alone (``stage2.pt`` renamed ``stage2_rejected.pt``, both scores in
    ``model.json`` under ``stage2_rejected``), so that training a cascade never makes the model worse."""
    checkpoints = [out / f"checkpoint_stage{n}.pt" for n in (1, 2)]
    if not all(c.exists() for c in checkpoints):
        return
    scores = [load_checkpoint(c)["progress"]["best_score"] for c in checkpoints]
    if scores[1] > scores[0]:
        return
    os.replace(out / "stage2.pt", out / "stage2_rejected.pt")
    note = {"stage1_validation_dice": scores[0], "stage2_validation_dice": scores[1]}
    save_model_dir(out, {**meta, "stage2_rejected": note}, stage1, None, force=True)
    print(
        f"meunet train: stage 2 validated at mean foreground Dice {scores[1]:.3f}, stage 1 at "
        f"{scores[0]:.3f}: the model is stage 1 alone (stage2.keep_if_better: false keeps the cascade)",
        file=sys.stderr,
    )


def train(
    config: TrainConfig, resume: bool = False, force: bool = False, started: float | None = None
) -> Path:
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
        started: ``time.monotonic()`` when the command began (default: now), from which
            ``training.time_budget`` counts.

    Returns:
        The model directory.

    Raises:
        InputError: a bad device, output state, data set or volume (one line naming the problem), or another
            run training into the same output.

    >>> from meunet.train import parse_config
    >>> config = parse_config({
    ...     "output": str(tmp / "trained"), "stages": 1, "data": {"dataset": str(dataset)},
    ...     "model": {"widths": [2, 4, 4, 4, 4], "norm": "batch", "checkpointing": False},
    ...     "patch": {"size": 16}, "training": {"max_iterations": 2, "batch_size": 2, "progress": False},
    ... }, "example")
    >>> model_dir = train(config)
    >>> sorted(p.name for p in model_dir.glob("*.pt"))
    ['checkpoint_stage1.pt', 'stage1.pt']
    """
    started = time.monotonic() if started is None else started
    if ddp.launched():
        check_distributed(config, ddp.launched_processes())
    device = ddp.process_device(resolve_device(config.device))
    with ddp.session(device), contextlib.ExitStack() as held:

        def lock() -> None:  # rank 0's: another run's lock is one line on every process
            held.enter_context(output_lock(config.output))

        ddp.on_main(lock)
        created = not config.output.exists()  # under the lock: no other run can make it now
        try:
            return _train(config, resume, force, started, device)
        except BaseException:
            if ddp.first_process() and created:
                _discard_unresumable(config.output)
            raise


def _discard_unresumable(out: Path) -> None:
    """Remove the model directory a failed run made (it holds only what this run wrote, under its lock)
    unless it holds a checkpoint that ``--resume`` continues from: a run that fails (a full disk, an
    interrupt) before its first checkpoint leaves nothing behind."""
    if out.is_dir() and not any(out.rglob("*checkpoint*.pt")):
        shutil.rmtree(out, ignore_errors=True)


def check_distributed(config: TrainConfig, processes: int) -> None:
    """What training on several processes refuses before any process starts work: a time budget (planned
    and timed for one process), and a batch size of the user's that the processes cannot share evenly. (The
    device: :func:`meunet.ddp.check_device`.)

    Raises:
        InputError: one of these, naming the key.
    """
    if config.training.time_budget is not None:
        raise InputError(
            "training.time_budget",
            "plans and times one process: with several, set the limits (max_epochs, max_iterations) instead",
        )
    if "training.batch_size" in user_keys(config):
        ddp.check_batch(config.training.batch_size, processes)


def _plan(
    config: TrainConfig, split, device: torch.device, started: float
) -> tuple[TrainConfig, Plan | None]:
    """Plan the keys ``config`` leaves out (:func:`meunet.train.plan.plan_run`), timing the chosen sizes on
    ``device`` when a time budget is set. Nothing to plan and no budget: no plan. A planned batch fits one
    device: under torchrun each process takes one, so the global batch is that times the processes."""
    fixed, budget = user_keys(config), config.training.time_budget
    if budget is None and all(key in fixed for key in PLANNED_KEYS):
        return config, None
    begun = time.monotonic()
    data = fingerprint(split.train, split.validation, split.classes)
    measure = None if budget is None else partial(calibrate, device=str(device))
    # the data checks that follow read the volumes once more, as the fingerprint did
    spent = time.monotonic() - started + time.monotonic() - begun
    plan = plan_run(data, probe_device(str(device)), fixed, budget, measure, spent)
    planned = apply_plan(config, plan)
    if ddp.world_size() > 1 and "training.batch_size" in plan.planned:  # planned for one device's memory
        batch = planned.training.batch_size * ddp.world_size()
        planned = planned.model_copy(
            update={"training": planned.training.model_copy(update={"batch_size": batch})}
        )
    return planned, plan


def _train(config: TrainConfig, resume: bool, force: bool, started: float, device: torch.device) -> Path:
    """:func:`train`, run under the lock of its output (held by rank 0 under torchrun)."""
    out = config.output
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed patch and window sizes: pick fast kernels
    config, stages, data, meta, plan = ddp.on_main(partial(_prepare, config, resume, force, started, device))
    budget = config.training.time_budget
    log = TrainLog(out / "train_log.csv", data.split.classes)
    clock = None if budget is None else Deadline(started + BUDGET_USE * budget, plan)
    run = _Run(config, data, meta, out, device, log, resume, clock)
    stage1_changed = 1 in stages and _train_stage1(run)
    if 2 in stages:
        _train_stage2(replace(run, resume=resume and not stage1_changed))
    if ddp.is_main():
        if clock is None or clock.affords("post-processing"):
            _choose_postprocessing(config, data, out, device)
        else:
            _say("time budget spent: no post-processing chosen (none is applied)")
        log.plot(out / "curves.png")
    ddp.barrier()
    return out


def _prepare(config: TrainConfig, resume: bool, force: bool, started: float, device: torch.device):
    """Rank 0's checks and plan before any training: the output state, the checkpoints to resume, the split,
    the plan, every volume, the stage 1 that a stage-2 run builds on; then the model directory's folder
    (emptied of training files with ``force``). Returns ``(config, stages, data, meta, plan)``."""
    out = config.output
    stages = {"1": [1], "2": [2], "both": [1, 2]}[config.stages]
    _check_output(out, stages, resume, force)
    if resume:  # a broken or foreign checkpoint, or a changed network, is one line before any work
        _check_same_network(config, out)
        for checkpoint in sorted(out.glob("*checkpoint*.pt")):
            if checkpoint.name.startswith("."):  # the temporary of a process killed while writing it: its
                checkpoint.unlink()  # writer held this output's lock, which is ours now
            else:
                load_checkpoint(checkpoint)
    split = resolve_split(config)
    if resume:  # a damaged log is one line before any work too
        for log in [out / "train_log.csv", *sorted((out / CACHE_DIR).glob("fold*_log.csv"))]:
            TrainLog(log, split.classes)
    config, plan = _plan(config, split, device, started)
    stages = {"1": [1], "2": [2], "both": [1, 2]}[config.stages]  # the plan may train stage 1 alone
    data = prepare_data(config, split)
    absent = [name for name, n in zip(split.classes, data.index.class_counts, strict=True) if n == 0]
    if set(split.classes[1:]) <= set(absent):
        where = split.train[0].label if len(split.train) == 1 else "data.train"
        raise InputError(where, f"no training patch holds {', '.join(split.classes[1:])}: nothing to learn")
    if absent:
        them = "it" if len(absent) == 1 else "them"
        _say(f"no training patch holds {', '.join(absent)}: the model cannot learn to label {them}")
    if plan is not None:  # after the data checks: a bad volume is one line
        print(format_plan(plan), file=sys.stderr)
        if ddp.world_size() > 1 and "training.batch_size" in plan.planned:
            _say(
                f"{ddp.world_size()} processes: the planned batch of {plan.value('training.batch_size')} per "
                f"process makes a global batch of {config.training.batch_size}"
            )
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
    if plan is not None:
        meta["plan"] = plan.to_json()
    out.mkdir(parents=True, exist_ok=True)
    if force:
        _remove_outputs(out, stages)
        if previous is not None:  # back to a stage-1 model directory
            save_model_dir(out, meta, previous.stage1, None, force=True)
    return config, stages, data, meta, plan


RESUMED_KEYS = ("model", "patch.size", "patch.context_scale")
"""What a resumed run must keep from the run it continues (the networks and their inputs)."""


def _check_same_network(config: TrainConfig, out: Path) -> None:
    """Refuse to resume with a key of :data:`RESUMED_KEYS` set otherwise than in the run in ``out``
    (``model.json``'s ``train_config``; none there: the checkpoints' own checks decide).

    Raises:
        InputError: naming the first such key, its value and the run's.
    """
    try:
        before = json.loads((out / "model.json").read_text())["train_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = config.model_dump(mode="json")
    for key in user_keys(config):
        section, _, name = key.partition(".")
        if key in RESUMED_KEYS or section in RESUMED_KEYS:
            if before.get(section, {}).get(name) != now[section][name]:
                raise InputError(
                    key,
                    f"{now[section][name]} differs from the run being resumed in {out} "
                    f"({before.get(section, {}).get(name)}): put it back, or start over with --force",
                )


def _choose_postprocessing(config: TrainConfig, data: TrainingData, out: Path, device) -> None:
    """Predict the validation volumes with the final model, choose the post-processing rules that raise
    validation Dice (:func:`meunet.infer.postprocess.choose_rules`) and store them in ``model.json``
    (``postprocessing``); prints what was chosen."""
    bundle = load_model_dir(out, device)
    engine = _engine(config, device)
    n_classes = len(data.split.classes)
    pairs = []
    for i, pair in enumerate(data.split.validation):
        inputs = [image_input(open_array(pair.image), data.normalization)]
        if bundle.cascade is not None:
            inputs.append(stage1_input(zarr.open_array(str(out / CACHE_DIR / f"validation_{i}.zarr"))))
        truth = np.asarray(open_array(pair.label)).astype(np.uint8, copy=False)
        pairs.append((validation_labels(bundle.net, inputs, n_classes, engine), truth))
    rules, dice = choose_rules(pairs, n_classes)
    meta = json.loads((out / "model.json").read_text())
    meta["postprocessing"] = rules
    meta["postprocessing_validation_dice"] = dice
    write_json(out / "model.json", meta)
    chosen = ", ".join(
        f"{data.split.classes[int(c)]}: {next(iter(r))} ({dice[c]['before']:.3f} -> {dice[c]['after']:.3f})"
        for c, r in rules.items()
    )
    print(f"meunet train: post-processing chosen on validation: {chosen or 'none'}", file=sys.stderr)
