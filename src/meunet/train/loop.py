"""The training loop of one stage: optimisation, validation, best checkpoint, early stopping, resumption."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate
from tqdm import tqdm

from meunet import ddp
from meunet.data.augment import (
    apply_intensity,
    apply_transforms,
    perturb_probabilities,
    random_intensity,
    random_transforms,
)
from meunet.data.patches import PatchDataset
from meunet.errors import InputError
from meunet.models.bundle import load_matching
from meunet.models.cascade import stage1_fill
from meunet.precision import autocast, resolve_precision
from meunet.train.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from meunet.train.config import AugmentationConfig, Stage2Config, TrainConfig
from meunet.train.log import TrainLog
from meunet.train.loss import Across, wd_loss

Batch = dict[str, torch.Tensor]


@dataclass
class Progress:
    """Where a stage stands; saved in its checkpoint.

    Attributes:
        iteration: optimiser steps done.
        position: training-stream samples consumed (the sampler position).
        best_score: best mean foreground validation Dice so far (-inf before the first validation).
        best_iteration: iteration of the best score (whose weights are in the model directory).
        stale: validations since the last improvement.
        stopped_early: ``stale`` reached the patience.
        seconds: wall time spent in this stage, validation included.
    """

    iteration: int = 0
    position: int = 0
    best_score: float = -math.inf
    best_iteration: int = 0
    stale: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Stage:
    """What differs between training stage 1 and stage 2.

    Attributes:
        number: 1 or 2.
        net: the module to train (its parameters with ``requires_grad`` are optimised).
        dataset: the training stream.
        losses: ``losses(net, batch)`` -> dict with ``loss`` (to minimise) and the parts to log
            (``local_loss``, ``context_loss``), float32 scalars.
        validate: returns float64 (C,) validation Dice per class.
        save_best: writes the model directory with the current weights.
    """

    number: int
    net: nn.Module
    dataset: PatchDataset
    losses: Callable[[nn.Module, Batch], dict[str, torch.Tensor]]
    validate: Callable[[], np.ndarray]
    save_best: Callable[[], None]


def augment_batch(
    batch: Batch,
    generator: torch.Generator,
    augmentation: AugmentationConfig,
    image_fill: float,
    perturb: Stage2Config,
    first: int = 0,
    total: int | None = None,
) -> Batch:
    """Augment a batch on its device; one spatial transform per sample, shared by all of the sample's tensors
    (or, with ``augmentation.independent_context``, a second one for the context patches, as the paper's
    notebook draws them).

    Images (``image``, ``context_image``) are warped trilinearly with ``image_fill`` (normalised raw 0)
    outside, then get the same random intensity transforms (:func:`apply_intensity`); labels (``label``,
    ``context_label``, uint8) are warped by nearest neighbour, returned as int64, the context labels then
    taken at every second voxel; cached ``stage1`` probabilities trilinearly with one-hot background outside,
    then perturbed (:func:`perturb_probabilities` with ``perturb``'s settings).

    With ``first`` and ``total``, ``batch`` holds rows ``first ..`` of a global batch of ``total`` samples
    whose other rows other processes augment: every random number is drawn for the whole batch, so each
    process's rows are augmented as one process augments them, and ``generator`` ends in the same state.
    """
    a = augmentation
    n = len(batch["image"])
    total = n if total is None else total
    transforms = random_transforms(total, a.affine_probability, a.rotation, a.scale, a.flips, generator)
    context = transforms
    if a.independent_context and "context_image" in batch:
        context = random_transforms(total, a.affine_probability, a.rotation, a.scale, a.flips, generator)
    intensity = random_intensity(total, a.intensity_probability, generator)
    transforms, context = transforms.rows(first, n), context.rows(first, n)
    out = {}
    for key, value in batch.items():
        t = context if key.startswith("context_") else transforms
        if key.endswith("label"):
            out[key] = apply_transforms(value[:, None].float(), t, "nearest")[:, 0].long()
        elif key == "stage1":
            out[key] = apply_transforms(
                value.float(), t, "bilinear", torch.tensor(stage1_fill(value.shape[1]))
            )
        else:
            out[key] = apply_transforms(value, t, "bilinear", image_fill)
    images = [k for k in ("image", "context_image") if k in out]
    if a.intensity_probability > 0:
        changed = apply_intensity([out[k] for k in images], intensity, generator, first)
        out.update(zip(images, changed, strict=True))
    if "context_label" in out:
        out["context_label"] = out["context_label"][:, ::2, ::2, ::2]
    if "stage1" in out:
        out["stage1"] = perturb_probabilities(
            out["stage1"],
            generator,
            perturb.morphology_probability,
            perturb.max_radius,
            perturb.removal_probability,
            first=first,
            total=total,
        )
    return out


def learning_rate(config: TrainConfig, iteration: int, total: int) -> float:
    """The learning rate of step ``iteration`` (0-based) of ``total``: a linear warm-up over the first
    ``warmup`` fraction of the steps, then ``poly`` (``(1 - t) ** 0.9``, nnU-Net's), ``cosine`` or
    ``constant`` decay over the rest.

    >>> from meunet.train.config import parse_config
    >>> c = parse_config({"output": "m", "data": {"dataset": "d.json"}, "training": {"warmup": 0.1}}, "x")
    >>> [round(learning_rate(c, i, 100) / c.training.learning_rate, 3) for i in (0, 9, 10, 55, 99)]
    [0.1, 1.0, 1.0, 0.536, 0.017]
    """
    t = config.training
    warm = math.ceil(t.warmup * total)
    if iteration < warm:
        return t.learning_rate * (iteration + 1) / warm
    progress = (iteration - warm) / max(1, total - warm)
    factor = {
        "poly": (1 - progress) ** 0.9,
        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
        "constant": 1.0,
    }[t.schedule]
    return t.learning_rate * factor


def stage1_losses(
    net: nn.Module, batch: Batch, weights: torch.Tensor, across: Across | None = None
) -> dict[str, torch.Tensor]:
    """W_D on the local head plus W_D on the half-resolution context head (weights 1:1); ``across``: as in
    :func:`meunet.train.loss.wd_loss` (the losses of the global batch)."""
    local, context = net(batch["image"], batch["context_image"])
    local_loss = wd_loss(local, batch["label"], weights, across)
    context_loss = wd_loss(context, batch["context_label"], weights, across)
    return {"loss": local_loss + context_loss, "local_loss": local_loss, "context_loss": context_loss}


def local_losses(
    net: nn.Module, batch: Batch, weights: torch.Tensor, across: Across | None = None
) -> dict[str, torch.Tensor]:
    """W_D of a plain U-net's logits on the local patch (stage 1 with ``model.stage1: unet``)."""
    loss = wd_loss(net(batch["image"]), batch["label"], weights, across)
    return {"loss": loss, "local_loss": loss}


def stage2_losses(
    net: nn.Module, batch: Batch, weights: torch.Tensor, across: Across | None = None
) -> dict[str, torch.Tensor]:
    """W_D of the cascade's logits given the (augmented, perturbed) cached stage-1 probabilities."""
    loss = wd_loss(net(batch["image"], batch["stage1"]), batch["label"], weights, across)
    return {"loss": loss, "local_loss": loss}


RECALIBRATION_SAMPLES = 64


def recalibrate_batch_norm(
    stage: Stage,
    config: TrainConfig,
    device: torch.device,
    augment: Callable[[Batch, torch.Generator], Batch],
    position: int,
    samples: int = RECALIBRATION_SAMPLES,
) -> None:
    """Precise BatchNorm statistics for the current weights (Wu and Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021): the running mean and variance of every trained BatchNorm layer of ``stage.net`` become
    the average over ``samples`` training samples, rounded up to whole batches (those from ``position`` on,
    augmented with a generator seeded by the seed, stage and position), instead of the moving average of
    batches seen with older weights. With 32^3 patches at batch 2 to 4 that moving average lags enough to
    collapse evaluation-mode predictions; this makes evaluation match the weights being validated.

    Layers of frozen parts (stage 1 inside a stage-2 cascade) are left alone; a network without BatchNorm is
    untouched and no training random state is consumed, so resumption stays exact. With several processes
    every process runs this on its rows of each batch (``augment`` knows them) and synchronised BatchNorm
    averages over the whole batches, as one process does.
    """
    norms = [
        m
        for m in stage.net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight.requires_grad
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([config.seed, stage.number, position]).generate_state(1)[0])
    )
    stage.net.train()
    batch_size = config.training.batch_size
    precision = resolve_precision(config.precision, device)
    with torch.no_grad():
        for rows in RankRows(position, -(-samples // batch_size), batch_size).batches():
            # collated outside autocast: CPU and CUDA autocast refuse to stack float16 stage-1 probabilities
            batch = default_collate([stage.dataset[i] for i in rows])
            with autocast(precision, device):
                stage.losses(stage.net, augment({k: v.to(device) for k, v in batch.items()}, generator))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


@dataclass(frozen=True)
class RankRows:
    """The training-stream positions this process reads for ``steps`` global batches of ``batch`` samples
    from ``position`` on: its rows of each (:func:`meunet.ddp.share`); all of them with one process.
    Iterating gives the positions (a loader's sampler), :meth:`batches` one range per step."""

    position: int
    steps: int
    batch: int

    def batches(self) -> Iterator[range]:
        first, count = ddp.share(self.batch)
        for step in range(self.steps):
            start = self.position + step * self.batch + first
            yield range(start, start + count)

    def __iter__(self) -> Iterator[int]:
        for rows in self.batches():
            yield from rows

    def __len__(self) -> int:
        return self.steps * ddp.share(self.batch)[1]


def iteration_limit(config: TrainConfig, kept_patches: int, *, epochs_only: bool = False) -> int:
    """Iterations allowed: ``max_iterations``, or ``max_epochs`` passes over the kept patches if fewer
    (``epochs_only``: the epoch limit alone)."""
    training = config.training
    by_epochs = math.ceil(training.max_epochs * kept_patches / training.batch_size)
    return by_epochs if epochs_only else min(by_epochs, training.max_iterations or by_epochs)


@dataclass(frozen=True)
class PhaseClock:
    """The time one phase of a time-budgeted run has.

    Attributes:
        end: ``time.monotonic()`` by which the phase must have ended: it validates and stops at the step
            after which one more step and one more validation (as long as the last) would pass it.
        validation_seconds: how long a validation is expected to take until one has been timed.
        stretch: the iterations were planned to fill the time; at each validation they are planned again
            from the measured step and validation times (:func:`steps_to_fill`), within the epoch limit,
            so that an estimate tens of percent off neither ends the phase early nor late.
    """

    end: float
    validation_seconds: float = 0.0
    stretch: bool = False


def steps_to_fill(seconds: float, step_seconds: float, validation_seconds: float, every: int) -> int:
    """Optimiser steps that fit in ``seconds`` at ``step_seconds`` each, with a validation of
    ``validation_seconds`` after every ``every`` steps and one after the last.

    >>> steps_to_fill(100.0, 1.0, 10.0, 10)  # 45 steps and 5 validations: 95 s
    45
    >>> steps_to_fill(5.0, 1.0, 10.0, 10)
    0
    """
    per_step = step_seconds + validation_seconds / every
    return max(0, math.floor((seconds - validation_seconds) / per_step))


class StageTrainer:
    """Trains one stage, in the named steps that nnU-Net's ``run_training`` reads as: :meth:`restore` (or a
    fresh start), then :meth:`train_step` per batch and, every ``validate_every`` iterations (default: once
    per epoch), at the last iteration and at a deadline, :meth:`validate` (which keeps the best weights) and
    :meth:`save_checkpoint`; :meth:`run` is that loop.

    Args:
        stage: the stage's network, data and callbacks.
        config: the training configuration.
        checkpoint: this stage's checkpoint file.
        log: the training log (rows past a resumed checkpoint are dropped).
        device: where to train.
        augment: ``augment(batch, generator)`` applied on the device before each step (with several
            processes also given the rows: ``first``, ``total``; see :func:`augment_batch`).

    Under torchrun every process runs it: each trains on its rows of every global batch (:class:`RankRows`)
    through ``DistributedDataParallel`` (:func:`meunet.ddp.distribute`), all draw the random numbers of the
    whole batch, and rank 0 alone validates (the others receive the Dice), logs and writes the model
    directory and the checkpoint; all wait for it before :meth:`run` returns.
    """

    def __init__(
        self,
        stage: Stage,
        config: TrainConfig,
        checkpoint: Path,
        log: TrainLog,
        device: torch.device,
        augment: Callable[[Batch, torch.Generator], Batch],
    ) -> None:
        self.stage, self.config, self.checkpoint, self.log, self.device = (
            stage,
            config,
            checkpoint,
            log,
            device,
        )
        batch_size = config.training.batch_size
        if ddp.world_size() > 1:
            augment = partial(augment, first=ddp.share(batch_size)[0], total=batch_size)
        self.augment = augment
        params = [p for p in stage.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.training.learning_rate)
        self.precision = resolve_precision(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([config.seed, stage.number]).generate_state(1)[0])
        )
        self.progress = Progress()
        self.total = iteration_limit(config, len(stage.dataset))

    def restore(self, resume: bool) -> None:
        """Continue from the checkpoint where ``resume`` and it exists (weights, optimiser, loss scaler, all
        random states, progress and sampler position); otherwise start afresh and delete it."""
        if resume and self.checkpoint.exists():
            state = load_checkpoint(self.checkpoint)
            load_matching(self.checkpoint, self.stage.net, state["net"])
            try:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scaler.load_state_dict(state["scaler"])
                self.generator.set_state(state["generator"])
                restore_rng_states(state["rng"])
                self.progress = Progress(**state["progress"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                why = f"not a resumable checkpoint of this run ({exc!r})"[:300]
                raise InputError(self.checkpoint, why) from None
        elif ddp.is_main():
            self.checkpoint.unlink(missing_ok=True)

    def train_step(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """One optimiser step of ``model`` (the stage's network, wrapped for DDP) on ``batch``, augmented
        here, at the scheduled learning rate; returns the losses.

        Raises:
            InputError: the loss is not finite (the weights are left as they were).
        """
        progress, training = self.progress, self.config.training
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, progress.iteration, self.total)
        batch = self.augment(
            {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, self.generator
        )
        with autocast(self.precision, self.device):
            losses = self.stage.losses(model, batch)
        if not torch.isfinite(losses["loss"].detach()).item():  # stop before non-finite weights exist
            raise InputError(
                "training",
                f"non-finite loss at stage {self.stage.number} step {progress.iteration + 1}: "
                "lower training.learning_rate or check the data",
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        progress.iteration += 1
        progress.position += training.batch_size
        return {key: value.item() for key, value in losses.items()}

    def validate(self, trained_samples: int) -> tuple[np.ndarray, float]:
        """Recalibrate BatchNorm (:func:`recalibrate_batch_norm`, on at most ``trained_samples``: a third of
        the interval's compute), validate on rank 0, write the model directory if the mean foreground Dice
        improved, and count towards early stopping. Returns (Dice per class, mean foreground Dice)."""
        stage, progress = self.stage, self.progress
        samples = min(RECALIBRATION_SAMPLES, trained_samples)
        recalibrate_batch_norm(stage, self.config, self.device, self.augment, progress.position, samples)
        dice = ddp.on_main(stage.validate)
        stage.net.train()
        foreground = dice[1:][np.isfinite(dice[1:])]
        score = float(foreground.mean()) if foreground.size else 0.0
        if score > progress.best_score:
            progress.best_score, progress.best_iteration, progress.stale = score, progress.iteration, 0
            if ddp.is_main():
                stage.save_best()
        else:
            progress.stale += 1
            progress.stopped_early = progress.stale >= self.config.training.patience
        return dice, score

    def save_checkpoint(self) -> None:
        """Write the resumable state to the checkpoint (temporary name, then rename); rank 0's, the global
        state, so that another number of processes may resume it."""
        save_checkpoint(
            self.checkpoint,
            {
                "stage": self.stage.number,
                "net": self.stage.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "generator": self.generator.get_state(),
                "rng": rng_states(),
                "progress": asdict(self.progress),
            },
        )

    def run(self, resume: bool, clock: PhaseClock | None = None) -> int:
        """Train until the iteration limit, early stop or the end of ``clock``; returns the optimiser steps
        taken in this call (0 when the stage had already finished).

        Args:
            resume: continue from the checkpoint if it exists (see :meth:`restore`).
            clock: the time this stage has in a time-budgeted run.
        """
        self.restore(resume)
        progress, stage, batch_size = self.progress, self.stage, self.config.training.batch_size
        if progress.stopped_early or progress.iteration >= self.total:
            return 0  # a finished stage leaves the log alone (a later stage's rows are kept)
        self.log.keep_until(stage.number, progress.iteration)
        first = progress.iteration
        stretch = clock is not None and clock.stretch
        validation_seconds = 0.0 if clock is None else clock.validation_seconds
        limit = iteration_limit(self.config, len(stage.dataset), epochs_only=True) if stretch else self.total
        model = ddp.distribute(stage.net, self.device)
        every = self.config.training.validate_every or math.ceil(len(stage.dataset) / batch_size)
        loader = torch.utils.data.DataLoader(
            stage.dataset,
            batch_size=ddp.share(batch_size)[1],
            sampler=RankRows(progress.position, limit - progress.iteration, batch_size),
            num_workers=self.config.training.workers,
            pin_memory=self.device.type == "cuda",
        )
        sums: dict[str, float] = {}
        steps = 0
        started = time.perf_counter() - progress.seconds
        interval = time.perf_counter()
        stage.net.train()
        bar = tqdm(
            total=self.total,
            initial=progress.iteration,
            desc=f"stage {stage.number}",
            disable=not (self.config.training.progress and ddp.is_main()),
        )
        for batch in loader:
            values = self.train_step(model, batch)
            sums = {key: sums.get(key, 0.0) + value for key, value in values.items()}
            steps += 1
            bar.update()
            bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
            now = time.perf_counter()
            step_seconds = (now - interval) / steps
            late = clock is not None and time.monotonic() + step_seconds + validation_seconds > clock.end
            if progress.iteration % every and progress.iteration < self.total and not late:
                continue
            dice, score = self.validate(steps * batch_size)
            validation_seconds = time.perf_counter() - now
            progress.seconds = time.perf_counter() - started
            row = {k: v / steps for k, v in sums.items()}
            row.update(stage=stage.number, iteration=progress.iteration, seconds=progress.seconds)
            row.update(
                it_per_s=1 / step_seconds,
                epoch=progress.position / len(stage.dataset),
                mean_foreground_dice=score,
            )
            if stretch and not late:
                left = clock.end - time.monotonic()
                fill = steps_to_fill(left, step_seconds, validation_seconds, every)
                self.total = bar.total = min(limit, progress.iteration + fill)
            if ddp.is_main():
                self.log.append(row, dice)
                self.save_checkpoint()
            sums, steps, interval = {}, 0, time.perf_counter()
            bar.set_postfix(loss=f"{row['loss']:.4f}", dice=f"{score:.3f}")
            if progress.stopped_early or late or progress.iteration >= self.total:
                break
        bar.close()
        ddp.barrier()  # rank 0's model directory and checkpoint are complete before any process reads them
        return progress.iteration - first
