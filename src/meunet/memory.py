"""Memory of one training step for the networks of docs/method.md sections 1-3, measured as section 7 says.

For each configuration one training step (forward, W_D loss, backward) is run and reported as a record:

- ``activation_bytes``: bytes of the tensors saved for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage; parameters and buffers are not
  counted. Exact, and the same on every device, ``meta`` included (no memory is touched there, so paper-scale
  figures take seconds). Checkpointed segments save only their inputs, which is what is counted.
- ``peak_bytes``: the step's peak memory above the built model and its inputs. CUDA:
  ``torch.cuda.max_memory_allocated`` minus what was allocated before the step. CPU: the peak resident set
  size of a fresh subprocess running the step minus that of a fresh subprocess that only builds the model and
  inputs, both counted from after their imports (Linux). ``None`` on ``meta``.
- ``step_seconds``: wall time of one step after one warm-up step; ``None`` on ``meta``.
- ``params``: trainable parameters (for a cascade, stage 2 and the fusion; stage 1 is frozen).

Precision ``bf16``/``fp16`` is automatic mixed precision (``torch.autocast``) on CPU and CUDA; on ``meta``,
where autocast does not exist, model and inputs are cast to that dtype instead (an approximation of AMP).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meunet.models import PAPER_WIDTHS, Cascade, MeUNet, UNet3D, context_side
from meunet.precision import AUTOCAST, autocast, autocast_dtype

CONFIGS = (
    "unet-local",
    "unet-local-ckpt",
    "unet-fov",
    "unet-fov-ckpt",
    "meunet-stage1",
    "cascade-pre-stage2",
    "cascade-post-stage2",
)
N_CLASSES = 3
RECORD_KEYS = (
    "config",
    "patch",
    "context",
    "batch",
    "precision",
    "device",
    "params",
    "activation_bytes",
    "peak_bytes",
    "step_seconds",
)


@dataclass(frozen=True)
class StepSetting:
    """What one training step is measured with (all configurations of a table share it).

    Attributes:
        patch: side of the local patch (voxels).
        context_scale: context side / local side (see :func:`meunet.models.context_side`).
        batch: patches per step.
        widths: five encoder widths.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: ``meta``, ``cpu`` or ``cuda``.
    """

    patch: int = 160
    context_scale: float = 1.5
    batch: int = 1
    widths: tuple[int, ...] = PAPER_WIDTHS
    precision: str = "fp32"
    device: str = "meta"

    @property
    def context(self) -> int:
        """Side of the context patch (voxels), e.g. 240 for 160 and 1.5."""
        return context_side(self.patch, self.context_scale)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of weights and inputs: float32, except on ``meta`` (no autocast there) the precision's."""
        return (autocast_dtype(self.precision) or torch.float32) if self.device == "meta" else torch.float32


def build_step(config: str, setting: StepSetting) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """Model of a configuration (training mode, on ``setting.device``, weights in ``setting.dtype``) and a
    closure that runs forward + W_D loss (uniform class weights).

    Inputs are random: images (batch, 1, side, side, side) in ``setting.dtype``, labels (batch, side, side,
    side) uint8 in [0, 3), cached stage-1 probabilities float16 for the cascades. ``unet-fov*`` and the
    context of ``meunet-stage1`` use ``setting.context`` as side; the rest use ``setting.patch``.

    Returns:
        (model, loss_fn): ``loss_fn()`` returns the float32 scalar loss of one forward pass.
    """
    from meunet.train.loss import (
        wd_loss,  # here: meunet.train imports meunet.infer, which imports this module
    )

    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, not {config!r}")
    torch.manual_seed(0)
    device, dtype, batch, widths = setting.device, setting.dtype, setting.batch, setting.widths
    weights = torch.full((N_CLASSES,), 1 / N_CLASSES, device=device)
    side = setting.context if config.startswith("unet-fov") else setting.patch

    def sample(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.randn(batch, 1, size, size, size, device=device, dtype=dtype)
        return image, torch.randint(0, N_CLASSES, (batch, size, size, size), dtype=torch.uint8, device=device)

    with torch.device(device) if device == "meta" else nullcontext():
        if config.startswith("unet-"):
            model = UNet3D(1, N_CLASSES, widths, checkpointing=config.endswith("-ckpt"))
        elif config == "meunet-stage1":
            model = MeUNet(1, N_CLASSES, widths=widths)
        else:
            fusion = "pre" if config == "cascade-pre-stage2" else "post"
            stage2 = UNet3D(1 + (N_CLASSES if fusion == "pre" else 0), N_CLASSES, widths, checkpointing=True)
            model = Cascade(MeUNet(1, N_CLASSES, widths=widths), stage2, fusion)
    model = model.to(device, dtype).train()
    image, labels = sample(side)

    if config == "meunet-stage1":
        context, context_labels = sample(setting.context)
        context_labels = context_labels[:, ::2, ::2, ::2]

        def loss_fn() -> torch.Tensor:
            local_logits, context_logits = model(image, context)
            return wd_loss(local_logits, labels, weights) + wd_loss(context_logits, context_labels, weights)

    elif config.startswith("cascade"):
        cached = torch.rand(batch, N_CLASSES, side, side, side, device=device).half()

        def loss_fn() -> torch.Tensor:
            return wd_loss(model(image, cached), labels, weights)

    else:

        def loss_fn() -> torch.Tensor:
            return wd_loss(model(image), labels, weights)

    return model, loss_fn


def count_saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for backward meanwhile.

    Each storage counts once (views and in-place results share it), whatever part of it is saved; storages
    of ``exclude`` (e.g. parameters and buffers) do not count. Works on every device, ``meta`` included.

    Returns:
        (fn's result, bytes).
    """
    excluded = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in excluded:
            seen[storage._cdata] = storage.nbytes()
        return t  # kept alive by the graph: no storage is freed, and so none reused, before backward

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def measure_step(config: str, setting: StepSetting) -> dict[str, Any]:
    """One training step of ``config`` in this process: a record with the keys of :data:`RECORD_KEYS`.

    ``peak_bytes`` is filled on CUDA only (on CPU see :func:`measure_memory`); on ``meta`` only
    ``params`` and ``activation_bytes`` are figures, ``peak_bytes`` and ``step_seconds`` are None.
    """
    if setting.precision not in AUTOCAST:
        raise ValueError(f"precision must be one of {tuple(AUTOCAST)}, not {setting.precision!r}")
    model, loss_fn = build_step(config, setting)
    state = [*model.parameters(), *model.buffers()]

    def step() -> int:
        model.zero_grad(set_to_none=True)
        with autocast(setting.precision, setting.device):
            loss, saved = count_saved_bytes(loss_fn, exclude=state)
        loss.backward()
        return saved

    cuda = setting.device.startswith("cuda")
    if setting.device != "meta":
        step()  # warm-up (allocator, cuDNN algorithm choice, lazy imports)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    saved = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "config": config,
        "patch": setting.patch,
        "context": setting.context,
        "batch": setting.batch,
        "precision": setting.precision,
        "device": setting.device,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "activation_bytes": saved,
        "peak_bytes": torch.cuda.max_memory_allocated() - before if cuda else None,
        "step_seconds": None if setting.device == "meta" else seconds,
    }


_PROC = Path("/proc/self")


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: ``clear_refs`` 5); elsewhere the peak since start stays."""
    if (_PROC / "clear_refs").exists():
        (_PROC / "clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes: ``VmHWM`` on Linux (since the last
    :func:`reset_peak_rss`), else ``ru_maxrss`` (kilobytes, bytes on macOS)."""
    if (_PROC / "status").exists():
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _child() -> None:
    """Subprocess entry: ``argv[1]`` = JSON {"build_only": bool, "config": str, "setting": StepSetting}.

    The peak is counted from after the imports, whose transient peak would otherwise hide a small step.
    """
    import torch._dynamo  # noqa: F401  (checkpointing imports it lazily: load it in both kinds of child)

    reset_peak_rss()
    request = json.loads(sys.argv[1])
    setting = StepSetting(**{**request["setting"], "widths": tuple(request["setting"]["widths"])})
    if request["build_only"]:
        build_step(request["config"], setting)
        record: dict[str, Any] = {}
    else:
        record = measure_step(request["config"], setting)
    print(json.dumps({**record, "peak_rss": peak_rss_bytes()}))


def _run_child(build_only: bool, config: str, setting: StepSetting) -> dict[str, Any]:
    request = json.dumps({"build_only": build_only, "config": config, "setting": asdict(setting)})
    code = "from meunet.memory import _child; _child()"
    done = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(setting: StepSetting, configs: Sequence[str] = CONFIGS) -> list[dict[str, Any]]:
    """Records (keys :data:`RECORD_KEYS`) of one training step per configuration.

    On ``cpu`` each step runs in a fresh subprocess, and ``peak_bytes`` is its peak RSS minus that of a fresh
    subprocess that only builds the model and inputs; elsewhere steps run in this process.
    """
    records = []
    for config in configs:
        if setting.device == "cpu":
            record = _run_child(False, config, setting)
            record["peak_bytes"] = record.pop("peak_rss") - _run_child(True, config, setting)["peak_rss"]
        else:
            record = measure_step(config, setting)
            if setting.device.startswith("cuda"):
                torch.cuda.empty_cache()
        records.append(record)
    return records


def activation_ratio(records: Sequence[dict[str, Any]]) -> float | None:
    """``meunet-stage1`` activation bytes / ``unet-fov`` activation bytes, or None if either is missing."""
    by_config = {r["config"]: r["activation_bytes"] for r in records}
    if "meunet-stage1" not in by_config or "unet-fov" not in by_config:
        return None
    return by_config["meunet-stage1"] / by_config["unet-fov"]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the records (MiB, seconds) and the meU-net / full-FOV U-net activation ratio."""
    mib = 2**20

    def cell(value: float | None, scale: float = 1, digits: int = 1) -> str:
        return "-" if value is None else f"{value / scale:,.{digits}f}"

    first = records[0]
    lines = [
        f"one training step: local {first['patch']}^3, context {first['context']}^3, batch {first['batch']}, "
        f"{first['precision']}, device {first['device']}",
        f"{'config':<20} {'params':>10} {'activation MiB':>15} {'peak MiB':>10} {'step s':>8}",
    ]
    for r in records:
        lines.append(
            f"{r['config']:<20} {r['params']:>10,} {cell(r['activation_bytes'], mib):>15} "
            f"{cell(r['peak_bytes'], mib):>10} {cell(r['step_seconds'], digits=2):>8}"
        )
    ratio = activation_ratio(records)
    if ratio is not None:
        lines.append(f"meunet-stage1 / unet-fov activation bytes: {ratio:.1%}")
    return "\n".join(lines)


def plot_memory(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Bar chart (PNG) of activation bytes and, where measured, peak bytes per configuration, in GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    names = [r["config"] for r in records]
    series = {"activation (saved for backward)": [r["activation_bytes"] / gib for r in records]}
    if all(r["peak_bytes"] is not None for r in records):
        series["peak during step"] = [r["peak_bytes"] / gib for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        positions = [k + (i - (len(series) - 1) / 2) * width for k in range(len(names))]
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    first = records[0]
    ax.set_title(
        f"one training step: local {first['patch']}³, context {first['context']}³, batch {first['batch']}, "
        f"{first['precision']}, {first['device']}"
    )
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("GiB")
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
