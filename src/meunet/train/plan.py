"""Planning a training run from the data, the machine and a time budget (design section 9).

- :func:`fingerprint`: shapes, spacing, intensity percentiles, class voxel fractions and the sizes of the
  foreground objects of the training volumes, each volume read once, slab by slab.
- :func:`probe_device`: the device's kind, memory, cores and bf16 support (or a described, absent GPU).
- :func:`plan_run`: the decisions, a pure function of those two (plus the keys the user set, a time budget
  and, where measured, :class:`Timing`). Every planned key carries its reason.
- :func:`calibrate`: a few training steps and inference windows timed on the device itself.

Memory is not guessed: the tensors a training step saves for backward are counted exactly on the ``meta``
device (:func:`meunet.memory.count_saved_bytes`), for the networks as they will be trained. The peak adds
what checkpointing brings back while a segment is recomputed (see :data:`RECOMPUTE_TENSORS`), the weights,
their gradients and Adam's moments, and the inputs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np
import torch
import yaml

from meunet.baseline import ThresholdBaseline
from meunet.data.patches import sample_stride, scan_image
from meunet.data.sampling import check_labels
from meunet.errors import InputError
from meunet.infer import SlidingWindow
from meunet.infer.postprocess import joined_components
from meunet.io import iter_slabs, open_volume
from meunet.memory import count_saved_bytes
from meunet.metrics import confusion_matrix, dice_from_confusion
from meunet.models import PAPER_WIDTHS, Cascade, MeUNet, UNet3D
from meunet.precision import autocast_dtype, check_device, cpu_has_bf16
from meunet.train.config import ModelConfig, TrainConfig
from meunet.train.data import check_pair
from meunet.train.loop import PhaseClock
from meunet.train.loss import wd_loss

Shape3 = tuple[int, int, int]

GPU_SIDES = (160, 144, 128, 112, 96, 80, 64, 48, 32)
"""Local patch sides tried on a GPU, largest first: multiples of 16 (the bottleneck is 1/16 of the patch) up
to the paper's 160 (context 240)."""
CPU_WIDTHS = (8, 16, 32, 64, 64)
"""The network that trains on a 2-core CPU (benchmarks/real_vs_threshold.py's recipe: patch 32, batch 4)."""
CPU_SIDE = 32
BATCH = 4
MAX_MEMORY_GIB = 2**20
"""The most memory a plan is made for (a PiB): more is a typing mistake."""
MEMORY_FRACTION = 0.75
"""A plan's estimated peak stays below this fraction of the device's memory (allocator caching, cuDNN
workspaces, the CUDA context and fragmentation take the rest)."""
RECOMPUTE_TENSORS = 11
"""Full-resolution top-level tensors (batch x patch^3 x w0) that exist again while a checkpointed network
recomputes its top segment in backward. Fitted to the H100 peaks of docs/memory.md: meunet-stage1 peaks
10.4 of them above its activation bytes in fp32 at batch 1, 9.4 in bf16 at batch 2; a plain U-net 1.7 of them
without checkpointing."""
PLAIN_TENSORS = 2
VALIDATIONS = 5
"""Validations per stage a time-budgeted plan schedules (the last step is always one)."""
BUDGET_USE = 0.97
"""Fraction of the time budget a plan fills (the rest absorbs the error of the estimates)."""
LOOP_OVERHEAD = 1.3
"""Real training step / calibrated step (patch reads, augmentation, logging): with the CPU recipe on the
synthetic flies, 4.33 s/it in the training loop against 3.3 to 3.8 s timed alone by :func:`calibrate` just
before and after (2-core machine at load average 7), a ratio of 1.13 to 1.3."""
REFERENCE = {"cuda": 0.79 / 3453 / 2**20, "cpu": 0.59 / 98.8 / 2**20}
"""Seconds per activation byte of a stage-1 step where the device is absent and nothing can be timed:
H100, 160/240 batch 4 bf16 checkpointed, 1.26 it/s for 3,453 MiB; the 2-core CPU, the narrow recipe, one
thread, 0.59 s/it for 98.8 MiB (widths 8..32, instance norm) (docs/training.md)."""
INFERENCE_OVERHEAD = 1.2
"""A validation / the forward passes of its windows timed alone: 48.4 s against 63 x 0.65 s for a synthetic
fly of 192 x 96 x 96 with the CPU recipe (windows of 48, blending, normalisation, reading)."""
VALIDATION_SHARE = 0.25
"""Validations may take up to this share of a budgeted run's training time (then fewer, at least one)."""
FOLDS = 2
MIN_STEPS = 20
CASCADE_STEPS = 200
"""Fewest steps per training phase for which a budgeted plan trains stage 2 (and its folds) at all."""
FLAT_STD = 0.3
"""A window is flat when the standard deviation of its intensities is below this fraction of the training
images' (a window of air, or of one tissue, and its noise)."""
FLAT_SHARE = 0.25
"""Batch norm where at least this share of the context windows of the training images is flat. Instance norm
scales each window by its own statistics, so flat windows of different phases (air, tissue) look alike to
it: the re-acquired fly of ``benchmarks/real_vs_threshold.py`` (97 % air, 52 % of its 48^3 windows flat)
validated at mean foreground Dice 0.11 with instance norm and 0.83 with batch norm at step 100, while the
synthetic flies (at most 6 % flat) learn faster with instance norm (gut 0.71 against 0.30), and bone, cement
and sand have no flat window at 48^3."""
FLAT_SIDES = tuple(range(16, 257, 16))
"""Window sides at which :func:`fingerprint` measures the share of flat windows."""
SEPARABLE_DICE = 0.5
"""Batch norm where a threshold separates the classes: where :class:`meunet.baseline.ThresholdBaseline` fitted
to a training image scores at least this mean foreground Dice on it (:func:`threshold_dice`). Batch norm keeps
the absolute intensity that such classes are defined by; instance norm rescales every window and places their
boundaries less exactly. Re-acquired real scans (``benchmarks/real_vs_threshold.py``, stage 1, 300 steps;
the threshold's test Dice 0.87 to 0.99): bone 0.988 with batch norm against 0.975 with instance norm, cement
0.993 against 0.985, three-phase sand 0.955 against 0.933. Synthetic flies, whose gut and crop are about as
bright as the tissue around them (threshold Dice 0.13 to 0.16), learn their shapes faster with instance norm:
held-out gut Dice 0.77 against 0.02 after 150 steps (batch 4, widths 8..32)."""
SEPARABILITY_SIDE = 96
""":func:`threshold_dice` fits and scores the threshold on the central block of at most this side of each
training volume."""


@dataclass(frozen=True)
class Fingerprint:
    """What the planner knows of the data (from :func:`fingerprint`).

    Attributes:
        train_shapes, validation_shapes: (z, y, x) of each volume.
        spacing: (z, y, x) mm of the first training volume.
        percentiles: intensity at 0.5, 50 and 99.5 % of a strided sample of the training images.
        class_fractions: voxels of each class / all training voxels.
        object_sides: per foreground class, the cube side (voxels) of its 26-connected components' voxel
            counts: ``{"count", "median", "max"}``.
        flat_shares: window side -> share of the training images' disjoint windows of that side that are
            flat (see :data:`FLAT_STD`), for the sides of :data:`FLAT_SIDES`.
        threshold_dice: how well a threshold separates the classes (:func:`threshold_dice`; 0 where not
            measured).
    """

    train_shapes: list[Shape3]
    validation_shapes: list[Shape3]
    spacing: tuple[float, float, float]
    percentiles: dict[str, float]
    class_fractions: list[float]
    object_sides: dict[str, dict[str, float]] = field(default_factory=dict)
    flat_shares: dict[int, float] = field(default_factory=dict)
    threshold_dice: float = 0.0

    def flat_share(self, side: int) -> float:
        """The share of flat windows at the measured side nearest ``side`` (0 where none was measured)."""
        if not self.flat_shares:
            return 0.0
        return self.flat_shares[min(self.flat_shares, key=lambda s: (abs(int(s) - side), s))]


def flat_shares(samples: list[np.ndarray], strides: list[int], sides=FLAT_SIDES) -> dict[int, float]:
    """Share of disjoint windows whose intensity standard deviation is below :data:`FLAT_STD` of all the
    samples', per window side.

    Args:
        samples: (z, y, x) strided samples of the volumes (:func:`scan_image`), each taken every
            ``strides[i]`` voxels, so a window of side ``s`` covers ``s / strides[i]`` samples (at least 2).
        sides: window sides, in voxels of the volumes; a window is cut to a volume smaller than it.

    >>> flat = np.zeros((32, 32, 64), np.float32)
    >>> flat[:, :, 32:] = np.random.default_rng(0).normal(size=(32, 32, 32))
    >>> flat_shares([flat], [1], (32,))
    {32: 0.5}
    """
    overall = float(np.concatenate([s.ravel() for s in samples]).std())
    shares = {}
    for side in sides:
        flat = total = 0
        for sample, stride in zip(samples, strides, strict=True):
            window = [min(max(2, round(side / stride)), n) for n in sample.shape]
            counts = [n // w for n, w in zip(sample.shape, window, strict=True)]
            blocks = sample[tuple(slice(0, c * w) for c, w in zip(counts, window, strict=True))]
            blocks = blocks.reshape(counts[0], window[0], counts[1], window[1], counts[2], window[2])
            flat += int((blocks.std(axis=(1, 3, 5)) < FLAT_STD * overall).sum())
            total += math.prod(counts)
        shares[side] = round(flat / total, 4)
    return shares


def threshold_dice(image: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean foreground Dice of :class:`meunet.baseline.ThresholdBaseline` (median filter, multi-Otsu)
    fitted to the central block of side at most :data:`SEPARABILITY_SIDE` of ``image`` and ``labels``
    (Z, Y, X) and scored on it, over the foreground classes present there (0 where none is).

    >>> labels = np.zeros((32, 32, 32), np.uint8)
    >>> labels[8:24, 8:24, 8:24] = 1
    >>> noisy = 50 + 100 * labels + np.random.default_rng(0).normal(0, 10, labels.shape)
    >>> round(threshold_dice(noisy, labels, 2), 2)  # the median filter rounds the cube's corners
    0.98
    """
    side = SEPARABILITY_SIDE
    block = tuple(slice(start := max(0, (n - side) // 2), start + side) for n in image.shape)
    image, labels = np.asarray(image[block], np.float32), np.asarray(labels[block])
    present = [c for c in range(1, n_classes) if (labels == c).any()]
    if not present or labels.min() < 0 or labels.max() >= n_classes:  # refused later by the data checks
        return 0.0
    try:
        predicted = ThresholdBaseline.fit(image, labels, n_classes).predict(image)
    except ValueError:  # fewer grey values than classes: no threshold separates them
        return 0.0
    dice = dice_from_confusion(confusion_matrix(predicted, labels, n_classes))
    return float(np.mean(dice[present]))


def fingerprint(train: list, validation: list, classes: list[str]) -> Fingerprint:
    """Read every training volume once, slab by slab (``train``, ``validation``: pairs with ``image`` and
    ``label``; a label whose shape differs from its image's, a label value that is not a class index, or
    non-finite intensities: InputError)."""
    shapes = [tuple(check_pair(p)[0].array.shape) for p in validation]
    counts = np.zeros(len(classes), dtype=np.int64)
    samples, strides, sides, separability = [], [], {name: [] for name in classes[1:]}, []
    for pair in train:
        image, label = check_pair(pair)
        labels = label.array
        separability.append(threshold_dice(image.array, labels, len(classes)))
        per_volume = 2_000_000 // len(train) + 1
        samples.append(scan_image(image.array, pair.image, per_volume))
        strides.append(sample_stride(image.array.shape, per_volume))
        for _, slab in iter_slabs(labels):  # labels that are not class indices: the data checks' one line
            counts += np.bincount(
                check_labels(slab, len(classes), pair.label).ravel(), minlength=len(classes)
            )
        for c, name in enumerate(classes[1:], 1):
            sizes = joined_components(labels, c)[2]
            sides[name].extend(np.cbrt(sizes[sizes > 0]).tolist())
    sample = np.concatenate([s.ravel() for s in samples])
    return Fingerprint(
        train_shapes=[tuple(open_volume(p.image).array.shape) for p in train],
        validation_shapes=shapes,
        spacing=tuple(open_volume(train[0].image).spacing),
        percentiles={q: float(np.percentile(sample, float(q))) for q in ("0.5", "50", "99.5")},
        class_fractions=(counts / max(1, counts.sum())).tolist(),
        object_sides={
            name: {"count": len(s), "median": float(np.median(s)), "max": float(max(s))}
            for name, s in sides.items()
            if s
        },
        flat_shares=flat_shares(samples, strides),
        threshold_dice=round(float(np.mean(separability)), 4),
    )


@dataclass(frozen=True)
class DeviceInfo:
    """The machine a run is planned for.

    Attributes:
        kind: ``cuda`` or ``cpu`` (anything else is planned as a CPU).
        name: torch device (``cuda:0``, ``cpu``).
        memory_bytes: free GPU memory, or available RAM.
        cores: CPU cores this process may use.
        bf16: native bf16 arithmetic.
        present: on this machine (durations can be measured), not only described.
    """

    kind: str
    name: str
    memory_bytes: int
    cores: int
    bf16: bool
    present: bool = True


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def probe_device(name: str = "auto", memory_gib: float | None = None) -> DeviceInfo:
    """Describe ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as found here; ``memory_gib`` replaces the
    memory found, and describes a GPU that is not here (bf16 assumed, durations not measurable).

    Raises:
        InputError: an unknown device, a GPU absent without ``memory_gib``, or a memory not in
            (0, :data:`MAX_MEMORY_GIB`].
    """
    if memory_gib is not None and not 0 < memory_gib <= MAX_MEMORY_GIB:
        raise InputError(
            "--memory-gib", f"must be a number of GiB above 0, up to {MAX_MEMORY_GIB}, not {memory_gib}"
        )
    try:
        kind, _, index = check_device(name).partition(":")
    except ValueError as exc:
        raise InputError("--device", str(exc)) from None
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device", "mps is not available on this machine")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    described = None if memory_gib is None else int(memory_gib * 2**30)
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        i = int(index or 0)
        if torch.cuda.is_available() and i < torch.cuda.device_count():
            free = torch.cuda.mem_get_info(i)[0]
            bf16 = torch.cuda.is_bf16_supported()
            return DeviceInfo("cuda", f"cuda:{i}", described or free, cores, bf16)
        if described is None:
            raise InputError(
                "--device", f"{name} is not available on this machine (--memory-gib describes one)"
            )
        return DeviceInfo("cuda", f"cuda:{i}", described, cores, True, present=False)
    if kind == "mps":  # planned as a CPU (unified memory), timed on the GPU
        return DeviceInfo("mps", "mps", described or _available_ram(), cores, False)
    return DeviceInfo("cpu", "cpu", described or _available_ram(), cores, cpu_has_bf16())


@dataclass(frozen=True)
class Spec:
    """The sizes of the networks and patches a step is built from."""

    widths: tuple[int, ...]
    norm: str
    checkpointing: bool
    patch: int
    context_scale: float
    batch: int
    precision: str
    n_classes: int
    fusion: str = "post"
    stage1: str = "meunet"

    @property
    def context(self) -> int:
        """Context side, as :attr:`meunet.train.config.PatchConfig.context` rounds it."""
        return self.patch + 2 * round(self.patch * (self.context_scale - 1) / 2)


def _training_step(stage: int, spec: Spec, device: str):
    """Stage ``stage``'s network as training builds it, on ``device``, and a closure running forward + W_D
    loss on random inputs. On ``meta`` the weights and images are cast to the precision (autocast's stand-in
    there, within 1 % of AMP's activation bytes: docs/memory.md)."""
    dtype = (autocast_dtype(spec.precision) or torch.float32) if device == "meta" else torch.float32
    n, b, p, c = spec.n_classes, spec.batch, spec.patch, spec.context
    kwargs = {"widths": spec.widths, "norm": spec.norm, "checkpointing": spec.checkpointing}
    weights = torch.full((n,), 1 / n, device=device)
    torch.manual_seed(0)
    with torch.device(device):
        image = torch.randn(b, 1, p, p, p, dtype=dtype)
        labels = torch.randint(0, n, (b, p, p, p))
        if stage == 1 and spec.stage1 == "unet":  # a plain U-net on the local patch
            net = UNet3D(1, n, **kwargs)

            def loss():
                return wd_loss(net(image), labels, weights)

        elif stage == 1:
            net = MeUNet(1, n, **kwargs)
            context = torch.randn(b, 1, c, c, c, dtype=dtype)
            half = torch.randint(0, n, (b, c // 2, c // 2, c // 2))

            def loss():
                local_logits, context_logits = net(image, context)
                return wd_loss(local_logits, labels, weights) + wd_loss(context_logits, half, weights)

        else:
            stage2 = UNet3D(1 + (n if spec.fusion == "pre" else 0), n, **kwargs)
            net = Cascade(MeUNet(1, n, **kwargs), stage2, spec.fusion, "probs")
            cached = torch.rand(b, n, p, p, p).half()

            def loss():
                return wd_loss(net(image, cached), labels, weights)

    return net.to(device, dtype).train(), loss


@cache
def _counted(stage: int, spec: Spec) -> tuple[int, int, int]:
    """(activation bytes, trainable parameters, all parameters) of a training step, counted on ``meta``."""
    net, loss = _training_step(stage, spec, "meta")
    activations = count_saved_bytes(loss, exclude=[*net.parameters(), *net.buffers()])[1]
    trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
    return activations, trainable, sum(q.numel() for q in net.parameters())


def peak_bytes(stage: int, spec: Spec) -> int:
    """Estimated peak memory of one training step of stage ``stage``: activation bytes counted exactly on
    ``meta``, plus the recomputed top segment, weights, gradients, Adam's moments and the inputs."""
    activations, trainable, params = _counted(stage, spec)
    element = 4 if spec.precision == "fp32" else 2
    top = spec.batch * spec.patch**3 * spec.widths[0] * element
    context = spec.context**3 if stage == 1 and spec.stage1 == "meunet" else 0
    inputs = spec.batch * 4 * (spec.patch**3 * (2 + spec.n_classes) + context)
    transient = RECOMPUTE_TENSORS if spec.checkpointing else PLAIN_TENSORS
    return activations + transient * top + 16 * trainable + 4 * params + inputs


@dataclass(frozen=True)
class Timing:
    """Seconds measured on the device (:func:`calibrate`): one training step of each stage, one inference
    window (the context side) of stage 1 and of stage 2."""

    step: tuple[float, float]
    window: tuple[float, float]
    measured: bool = True


def calibrate(spec: Spec, device: str, steps: int = 2) -> Timing:
    """Time ``steps`` training steps (after one warm-up) of both stages and one inference window each, on
    ``device`` with ``spec``'s precision."""
    dtype = autocast_dtype(spec.precision)
    kind = torch.device(device).type
    seconds = []
    for stage in (1, 2):
        net, loss = _training_step(stage, spec, device)
        params = [q for q in net.parameters() if q.requires_grad]
        optimizer = torch.optim.Adam(params)
        for i in range(steps + 1):
            if i == 1:
                _sync(kind)
                start = time.perf_counter()
            with torch.autocast(kind, dtype=dtype, enabled=dtype is not None):
                value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        _sync(kind)
        step = (time.perf_counter() - start) / steps
        net.eval()
        c = spec.context
        inputs = [torch.randn(1, 1, c, c, c, device=device)]
        if stage == 2:
            inputs.append(torch.rand(1, spec.n_classes, c, c, c, device=device))
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=dtype is not None):
            net(*inputs)
            _sync(kind)
            start = time.perf_counter()
            net(*inputs)
            _sync(kind)
        seconds.append((step, time.perf_counter() - start))
    return Timing(step=(seconds[0][0], seconds[1][0]), window=(seconds[0][1], seconds[1][1]))


def _sync(kind: str) -> None:
    if kind == "cuda":
        torch.cuda.synchronize()


def reference_timing(spec: Spec, kind: str) -> Timing:
    """Durations where nothing can be timed: :data:`REFERENCE` seconds per activation byte of each stage's
    step; a window's forward pass as a third of a step's per voxel."""
    steps = [_counted(stage, spec)[0] * REFERENCE.get(kind, REFERENCE["cpu"]) for stage in (1, 2)]
    per_voxel = steps[0] / (3 * spec.batch * (spec.patch**3 + spec.context**3))
    window = per_voxel * spec.context**3
    return Timing(step=(steps[0], steps[1]), window=(window, window), measured=False)


@dataclass(frozen=True)
class Plan:
    """The decisions of :func:`plan_run`.

    Attributes:
        keys: dotted configuration key -> ``(value, why)``, the user's keys included (why: ``set``).
        planned: the keys the planner chose (the others were set).
        stages: per phase (``stage 1``, ``folds``, ``stage 2``, ``predictions``): ``peak_bytes``,
            ``seconds`` (None without a budget), ``iterations`` where it trains.
        window: the inference window side (the context side).
        seconds: the whole run's expected duration (None without a budget).
    """

    keys: dict[str, tuple[Any, str]]
    planned: tuple[str, ...]
    stages: dict[str, dict[str, Any]]
    window: int
    seconds: float | None
    device: DeviceInfo
    data: Fingerprint
    timing: Timing

    def value(self, key: str) -> Any:
        return self.keys[key][0]

    def to_json(self) -> dict[str, Any]:
        """What ``model.json`` stores under ``plan``: the keys with their reasons and the inputs."""
        return {
            "keys": {
                k: {"value": v, "why": why, "planned": k in self.planned} for k, (v, why) in self.keys.items()
            },
            "stages": self.stages,
            "window": self.window,
            "seconds": self.seconds,
            "device": asdict(self.device),
            "data": asdict(self.data),
            "timing": asdict(self.timing),
        }


def _windows(shapes: list[Shape3], side: int) -> int:
    engine = SlidingWindow((side,) * 3, overlap=0.5)
    return sum(math.prod(len(starts) for starts in engine.grid(shape)) for shape in shapes)


def choose_sizes(data: Fingerprint, device: DeviceInfo, fixed: dict[str, Any]) -> tuple[dict, Spec, dict]:
    """Precision, widths, checkpointing, stage-1 network, patch, batch and norm: ``(keys, spec, peaks)`` with
    ``keys`` as in :attr:`Plan.keys` and ``peaks`` the estimated peak bytes per stage.

    GPU: the paper's widths, checkpointing, a meU-net stage 1, batch 4 and the largest local side of
    :data:`GPU_SIDES` whose steps (both stages) fit :data:`MEMORY_FRACTION` of the memory (then batch 2, 1).
    CPU: the narrow network of :data:`CPU_WIDTHS`, no checkpointing, a plain U-net stage 1, patch 32,
    batch 4. Both: batch norm where at least :data:`FLAT_SHARE` of the context windows are flat, instance
    norm elsewhere.

    Raises:
        InputError: no plan fits the memory (the message says what the smallest needs).
    """
    gpu = device.kind == "cuda"
    keys: dict[str, tuple[Any, str]] = {}
    kind = "GPU" if gpu else "CPU"
    precision = keys_set(
        keys,
        fixed,
        "precision",
        "bf16" if device.bf16 else "fp32",
        f"the {kind} {'has' if device.bf16 else 'lacks'} native bf16"
        + (": half the activation memory" if device.bf16 else ""),
    )
    widths = keys_set(
        keys,
        fixed,
        "model.widths",
        list(PAPER_WIDTHS if gpu else CPU_WIDTHS),
        "the paper's" if gpu else "narrow: what trains in minutes on a CPU (widths 8..64)",
    )
    checkpointing = keys_set(
        keys,
        fixed,
        "model.checkpointing",
        gpu,
        "recompute in backward: a larger patch fits (the paper's)"
        if gpu
        else "small patches fit anyway; recomputing costs a third more time",
    )
    stage1 = keys_set(
        keys,
        fixed,
        "model.stage1",
        "meunet" if gpu else "unet",
        "the meU-net: its context costs little memory, which is what bounds a GPU (the paper's)"
        if gpu
        else "a plain U-net: time bounds a CPU, and at equal time it trains 1.6x the meU-net's steps (no "
        "context pass) and scored at least as well on every data set measured (docs/results.md)",
    )
    largest = max(16, 16 * (max(min(s) for s in data.train_shapes) // 16))
    sides = [s for s in (GPU_SIDES if gpu else (CPU_SIDE,)) if s <= largest] or [min(GPU_SIDES)]
    if "patch.size" in fixed:
        sides = [fixed["patch.size"]]
    norm = fixed.get("model.norm", ModelConfig.model_fields["norm"].default)
    batches = [BATCH, 2] + ([1] if norm == "instance" else [])  # batch statistics of one sample are poor
    batches = [fixed["training.batch_size"]] if "training.batch_size" in fixed else batches
    budget = MEMORY_FRACTION * device.memory_bytes
    base = dict(
        widths=tuple(widths),
        norm=norm,
        checkpointing=checkpointing,
        context_scale=fixed.get("patch.context_scale", 1.5),
        precision=precision,
        n_classes=len(data.class_fractions),
        fusion=fixed.get("model.fusion", "post"),
        stage1=stage1,
    )

    def peaks_of(side: int, batch: int) -> dict[str, int]:
        spec = Spec(patch=side, batch=batch, **base)
        return {"stage 1": peak_bytes(1, spec), "stage 2": peak_bytes(2, spec)}

    least = peaks_of(sides[-1], batches[-1])
    if max(least.values()) > budget:
        need = max(least.values()) / MEMORY_FRACTION / 2**30
        raise InputError(
            "memory",
            f"{device.memory_bytes / 2**30:.2f} GiB is too small for any network: the smallest plan (local "
            f"{sides[-1]}, batch {batches[-1]}, widths {list(widths)}, {precision}) needs {need:.2f} GiB",
        )
    # the largest side that fits (peaks grow with it), at the largest batch at which one does
    for batch in batches:
        low, high = 0, len(sides)  # sides[high:] fit, sides[:low] do not
        while low < high:
            middle = (low + high) // 2
            if max(peaks_of(sides[middle], batch).values()) <= budget:
                high = middle
            else:
                low = middle + 1
        if low < len(sides):
            break
    spec = Spec(patch=sides[low], batch=batch, **base)
    peaks = peaks_of(spec.patch, batch)
    share = f"{max(peaks.values()) / 2**30:.2f} GiB of the {budget / 2**30:.1f} GiB allowed"
    objects = max((o["max"] for o in data.object_sides.values()), default=0)
    seen = f"; the largest object spans about {objects:.0f} voxels" if objects else ""
    if gpu:
        why = f"the largest local/context pair whose training step fits ({share}){seen}"
    else:
        why = f"small patches are what a CPU trains at a useful speed ({share}){seen}"
    keys_set(keys, fixed, "patch.size", spec.patch, why)
    flat = data.flat_share(spec.context)
    context = f"{flat:.0%} of the training images' {spec.context}^3 windows are flat"
    separable = f"a threshold separates the classes (Dice {data.threshold_dice:.2f})"
    if data.threshold_dice >= SEPARABLE_DICE:
        reason, why = separable, "batch norm keeps the absolute intensity that places their boundaries"
    elif flat >= FLAT_SHARE:
        reason, why = context, "instance norm would make windows of air and of one tissue look alike"
    else:
        reason = None
        why = (
            f"a threshold does not separate the classes (Dice {data.threshold_dice:.2f}) and {context}: "
            "instance norm learns their shapes faster"
        )
    if reason is not None:
        one = spec.batch == 1
        why = f"{reason}, but batch statistics of one sample are poor" if one else f"{reason}: {why}"
    norm = "batch" if reason is not None and spec.batch > 1 else "instance"
    norm = keys_set(keys, fixed, "model.norm", norm, why)
    if norm != spec.norm:
        spec = replace(spec, norm=norm)
        peaks = {"stage 1": peak_bytes(1, spec), "stage 2": peak_bytes(2, spec)}
    keys_set(
        keys,
        fixed,
        "training.batch_size",
        spec.batch,
        "the paper's batch" if spec.batch == BATCH else f"no patch fits at batch {BATCH}",
    )
    return keys, spec, peaks


@dataclass(frozen=True)
class _Costs:
    """Seconds of one run layout: a step and a validation per training phase, the cache, post-processing."""

    step: dict[str, float]
    validation: dict[str, float]
    cache: float
    post: float

    @property
    def fixed(self) -> float:
        return self.cache + self.post

    def fill(self, seconds: float, every: int | None = None) -> tuple[int, int]:
        """``(iterations per phase, validations per phase)`` that fill ``seconds``: a validation every
        ``every`` steps (and at the last), or up to :data:`VALIDATIONS` validations, fewer where they would
        take over :data:`VALIDATION_SHARE` of it."""
        left = seconds - self.fixed
        step, validation = sum(self.step.values()), sum(self.validation.values())
        if every is not None:
            steps = max(0, int(left / (step + validation / every)))
            if steps * step + math.ceil(steps / every) * validation > left:  # the last validation overruns
                steps -= steps % every
            return steps, math.ceil(steps / every)
        count = VALIDATIONS
        while count > 1 and count * validation > VALIDATION_SHARE * left:
            count -= 1
        return int((left - count * validation) / step), count


def _costs(
    data: Fingerprint, spec: Spec, timing: Timing, stages: str, folds: int, out_of_fold: bool
) -> _Costs:
    t1, t2 = (s * (LOOP_OVERHEAD if timing.measured else 1.0) for s in timing.step)
    w1, w2 = (s * (INFERENCE_OVERHEAD if timing.measured else 1.0) for s in timing.window)
    val, train = _windows(data.validation_shapes, spec.context), _windows(data.train_shapes, spec.context)
    cascade = stages != "1"
    oof = out_of_fold and cascade
    step = {"stage 1": t1} if stages != "2" else {}
    step.update({f"fold {f}": t1 for f in range(folds if oof else 0)})
    step.update({"stage 2": t2} if cascade else {})
    validation = {p: val * (w2 if p == "stage 2" else w1) for p in step}
    blocks = len(data.train_shapes) < folds  # then every fold model predicts every training volume
    cache = (train * (folds if oof and blocks else 1) + val) * w1 if cascade else 0.0
    post = val * (w1 + (w2 if cascade else 0.0))
    return _Costs(step, validation, cache, post)


def plan_run(
    data: Fingerprint,
    device: DeviceInfo,
    fixed: dict[str, Any],
    budget: float | None = None,
    measure: Callable[[Spec], Timing] | None = None,
    spent: float = 0.0,
) -> Plan:
    """Every key the user left out (``fixed``: the dotted keys set, with their values), with its reason.

    With a budget, every training phase (stage 1, each out-of-fold fold, stage 2) trains the same number of
    steps (``training.max_iterations`` is per stage) with up to :data:`VALIDATIONS` validations, and the steps
    fill :data:`BUDGET_USE` of the budget after the data checks (``spent``), the validations, the stage-1
    cache and the choice of post-processing (predictions timed window by window). Where that leaves the
    cascade fewer than :data:`CASCADE_STEPS` steps per phase, and always on a CPU, only stage 1 is trained
    (``stages: 1``).

    Args:
        data: the fingerprint of the training and validation volumes.
        device: the device to train on.
        fixed: the keys the configuration sets (never changed).
        budget: seconds the whole command may take, or None (the iteration, epoch and patience limits
            decide, and no duration is estimated).
        measure: times the chosen sizes on the device (:func:`calibrate`); None: :func:`reference_timing`.
        spent: seconds of the run outside training and prediction (reading and checking the data).

    Raises:
        InputError: nothing fits the memory, or the budget is too short for the smallest run.
    """
    keys, spec, peaks = choose_sizes(data, device, fixed)
    timing = measure(spec) if measure is not None else reference_timing(spec, device.kind)
    folds = keys_set(
        keys, fixed, "stage2.folds", FOLDS, "the cheapest that gives every region out-of-fold output"
    )
    workers = min(8, device.cores - 1) if device.kind == "cuda" else 0
    why = "loader processes keep the GPU fed (2x faster at 160^3 with 8)"
    keys_set(
        keys, fixed, "training.workers", workers, why if workers else "loaders would compete for the cores"
    )
    out_of_fold = fixed.get("stage2.out_of_fold", True)
    stages = fixed.get("stages", "both")
    costs = _costs(data, spec, timing, stages, folds, out_of_fold)
    iterations = fixed.get("training.max_iterations")
    every = fixed.get("training.validate_every")
    count = None
    if budget is not None:
        if iterations is not None and iterations < MIN_STEPS:
            raise InputError(
                "training.max_iterations",
                f"{iterations} is below the {MIN_STEPS} steps per stage that a time-budgeted run trains at "
                "least: raise it, or leave it out for the budget to set",
            )
        usable = BUDGET_USE * budget - spent
        planned, count = costs.fill(usable, every)
        if "stages" not in fixed:
            alone = _costs(data, spec, timing, "1", folds, out_of_fold)
            single, single_count = alone.fill(usable, every)
            cascade = planned >= CASCADE_STEPS and device.kind == "cuda"
            stages = "both" if cascade else "1"
            why = f"both stages get {planned} steps each ({len(costs.step)} trainings with the folds)"
            if not cascade:
                why = (
                    f"stage 1 alone gets {single} steps; with stage 2 and its folds each would get {planned}"
                )
                if device.kind != "cuda" and planned >= CASCADE_STEPS:
                    why += (
                        ": on a CPU no cascade has beaten its stage 1 alone at equal time (docs/results.md)"
                    )
                costs, planned, count = alone, single, single_count
            keys_set(keys, fixed, "stages", stages, why)
        iterations = iterations or planned
        if iterations < MIN_STEPS:
            validations = math.ceil(MIN_STEPS / (every or MIN_STEPS))
            need = (
                costs.fixed
                + MIN_STEPS * sum(costs.step.values())
                + validations * sum(costs.validation.values())
            )
            raise InputError(
                "time budget",
                f"{_duration(budget)} is too short for this data on this device: the smallest run "
                f"({MIN_STEPS} steps per stage, {validations} validation{'s' * (validations > 1)} each) "
                f"needs about "
                f"{_duration((spent + need) / BUDGET_USE)}",
            )
        t1, t2 = timing.step
        speed = f"{t1:.2f} s (stage 1) and {t2:.2f} s (stage 2) per step timed here"
        speed = speed if timing.measured else "the reference speed (device not here to time)"
        keys_set(keys, fixed, "training.max_iterations", iterations, f"fills {_duration(budget)} at {speed}")
        each = _duration(max(costs.validation.values()))
        why = f"{count} validation{'s' * (count > 1)} per stage ({each} each)"
        every = keys_set(keys, fixed, "training.validate_every", math.ceil(iterations / count), why)
    phases: dict[str, dict[str, Any]] = {}
    for name, step in costs.step.items():
        if name == "stage 2":
            phases["stage-1 cache"] = {"seconds": costs.cache}
        validations = None if iterations is None else math.ceil(iterations / (every or iterations))
        phases[name] = {
            "iterations": iterations,
            "step_seconds": step,
            "peak_bytes": peaks["stage 2" if name == "stage 2" else "stage 1"],
            "seconds": None
            if iterations is None
            else iterations * step + validations * costs.validation[name],
            "validation_seconds": costs.validation[name],
        }
    phases["post-processing"] = {"seconds": costs.post}
    seconds = None if budget is None else spent + sum(p["seconds"] for p in phases.values())
    return Plan(
        keys=keys,
        planned=tuple(k for k in keys if k not in fixed),
        stages=phases,
        window=spec.context,
        seconds=seconds,
        device=device,
        data=data,
        timing=timing,
    )


def keys_set(keys: dict, fixed: dict, key: str, value: Any, why: str) -> Any:
    """Record ``key`` as planned (``value``, ``why``) unless ``fixed`` sets it; returns the value used."""
    keys[key] = (fixed[key], "set") if key in fixed else (value, why)
    return keys[key][0]


def _duration(seconds: float) -> str:
    """``"9 min 30 s"``, ``"45 s"`` or ``"2 h 5 min"``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def format_plan(plan: Plan) -> str:
    """The plan as a table: the device, every key with its value and reason, and each phase's estimates."""
    d = plan.device
    what = f"{d.name}, {d.memory_bytes / 2**30:.1f} GiB, {d.cores} cores, bf16 {'yes' if d.bf16 else 'no'}"
    lines = [f"plan for {what}{'' if d.present else ' (described, not here)'}"]
    for key, (value, why) in plan.keys.items():
        shown = value if not isinstance(value, list) else " ".join(map(str, value))
        lines.append(f"  {key:<28}{shown!s:<22}{'(yours)' if why == 'set' else why}")
    lines.append(f"  {'inference window':<28}{plan.window:<22}the context side")
    lines.append(f"  {'phase':<14}{'iterations':>11}{'s/step':>9}{'peak GiB':>10}{'duration':>14}")
    for name, s in plan.stages.items():
        peak = "" if "peak_bytes" not in s else f"{s['peak_bytes'] / 2**30:.2f}"
        step = "" if "step_seconds" not in s else f"{s['step_seconds']:.3f}"
        iterations = "" if s.get("iterations") is None else str(s["iterations"])
        duration = "-" if s["seconds"] is None else _duration(s["seconds"])
        lines.append(f"  {name:<14}{iterations:>11}{step:>9}{peak:>10}{duration:>14}")
    source = "measured here" if plan.timing.measured else "reference speed (docs/training.md)"
    total = (
        "no time budget: the iteration, epoch and patience limits decide"
        if plan.seconds is None
        else (f"expected whole run {_duration(plan.seconds)} (step times {source})")
    )
    lines.append(f"  {total}")
    return "\n".join(lines)


PLANNED_SECTIONS = ("model", "patch", "training", "stage2")
PLANNED_KEYS = (
    "precision",
    "model.stage1",
    "model.widths",
    "model.checkpointing",
    "model.norm",
    "patch.size",
    "training.batch_size",
    "training.workers",
    "stage2.folds",
)
"""The keys planned with or without a time budget (with one, also ``training.max_iterations`` and
``training.validate_every``)."""


def user_keys(config: TrainConfig) -> dict[str, Any]:
    """The dotted keys ``config`` sets itself, with their values (``precision: auto`` asks for a plan).

    A patch given as (z, y, x) counts as its largest side (a cube: the memory estimate errs on the safe side).
    """
    fixed: dict[str, Any] = {
        k: getattr(config, k) for k in ("precision", "stages") if k in config.model_fields_set
    }
    if fixed.get("precision") == "auto":
        del fixed["precision"]
    for section in PLANNED_SECTIONS:
        part = getattr(config, section)
        fixed.update({f"{section}.{k}": getattr(part, k) for k in part.model_fields_set})
    if "patch.size" in fixed:
        fixed["patch.size"] = max(fixed["patch.size"])
    return fixed


def apply_plan(config: TrainConfig, plan: Plan) -> TrainConfig:
    """``config`` with the planned keys set (validated again); the user's keys are untouched."""
    values = config.model_dump()
    for key in plan.planned:
        section, _, name = key.rpartition(".")
        (values[section] if section else values)[name] = plan.value(key)
    return TrainConfig.model_validate(values)


def planned_yaml(config: TrainConfig, plan: Plan) -> str:
    """The whole configuration as YAML, each planned key followed by ``# why``, paths absolute."""
    lines = [f"# planned by meunet plan: {plan.device.name}; keys without a comment are yours or defaults"]
    for key, value in config.model_dump(mode="json").items():
        if not isinstance(value, dict):
            lines.append(_yaml_line(key, value, plan, ""))
            continue
        lines.append(f"{key}:")
        lines.extend(_yaml_line(name, v, plan, f"{key}.") for name, v in value.items())
    return "\n".join(lines) + "\n"


def _yaml_line(name: str, value: Any, plan: Plan, prefix: str) -> str:
    flow = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    line = f"{'  ' if prefix else ''}{name}: {flow}"
    key = prefix + name
    return f"{line}  # {plan.keys[key][1]}" if key in plan.planned else line


class Deadline:
    """The end of a time-budgeted run, shared out between its phases as they start.

    A phase (``stage 1``, ``fold F``, ``stage 2``: names of :attr:`Plan.stages`) gets the time left times its
    planned share of the phases still to come (phases skipped over count as done), so a phase that ran long is
    made up by the later ones. Where the plan chose the iterations, a phase's are scaled by its time over its
    planned time and by how much slower than planned the run has been since its first phase started (and the
    step between validations with them, where planned).
    """

    def __init__(self, end: float, plan: Plan) -> None:
        self.end = end
        self.left = {name: phase["seconds"] for name, phase in plan.stages.items()}
        self.validation = {name: phase.get("validation_seconds", 0.0) for name, phase in plan.stages.items()}
        self.scale_iterations = "training.max_iterations" in plan.planned
        self.scale_every = "training.validate_every" in plan.planned
        self.began: float | None = None
        self.done = 0.0

    def start(self, name: str, config: TrainConfig) -> tuple[TrainConfig, PhaseClock]:
        """``(config, clock)`` of phase ``name``: its iterations scaled (where planned), and the time it has
        (stretched at its validations where the iterations were planned)."""
        now = time.monotonic()
        self.began = now if self.began is None else self.began
        slowness = self._slowness(now)
        names = list(self.left)
        for skipped in names[: names.index(name)] if name in names else names:
            self.done += self.left.pop(skipped)
        share = self.left.pop(name, 0.0)
        self.done += share
        allowed = max(0.0, self.end - now) * share / max(1e-9, share + sum(self.left.values()))
        if self.scale_iterations and share > 0:
            t = config.training
            steps = max(1, int(t.max_iterations * allowed / (share * slowness)))
            every = t.validate_every  # the planned count of validations is kept, a value the user set too
            if self.scale_every:
                every = math.ceil(steps / math.ceil(t.max_iterations / t.validate_every))
            training = t.model_copy(update={"max_iterations": steps, "validate_every": every})
            config = config.model_copy(update={"training": training})
        validation = self.validation.get(name, 0.0) * slowness
        return config, PhaseClock(now + allowed, validation, self.scale_iterations and share > 0)

    def affords(self, name: str) -> bool:
        """Whether phase ``name`` (not yet started) fits before the end at the speed the run has had."""
        now = time.monotonic()
        return now + self.left.get(name, 0.0) * self._slowness(now) <= self.end

    def _slowness(self, now: float) -> float:
        """Time taken since the first phase started / the planned time of the phases started so far."""
        return (now - self.began) / self.done if self.began is not None and self.done else 1.0
