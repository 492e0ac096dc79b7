"""Training on several processes (``torchrun``): the process group, the ranks and the collectives.

``torchrun --nproc-per-node N -m meunet train CONFIG`` starts N copies of ``meunet train``; each finds its
rank in the environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and
joins the process group in :func:`session`: NCCL on GPUs (process ``LOCAL_RANK`` of a node takes
``cuda:LOCAL_RANK``), gloo on CPUs. Outside torchrun (or with one process) nothing here does anything:
:func:`world_size` is 1, :func:`is_main` is true and every collective is the identity.

Rank 0 alone reads and checks the data, plans, validates, logs and writes files; :func:`on_main` runs such a
step there and hands its result (or its error) to every rank. Training steps run on every rank, each on its
rows of the global batch (:func:`share`), with the losses' sums added over the ranks (:func:`sum_over_ranks`)
and batch norm over the global batch (:class:`SyncBatchNorm3d`). ``meunet train --nproc N`` starts the N
processes of one machine itself (:func:`launch`), as ``torchrun --standalone`` does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from meunet.errors import Elsewhere, InputError
from meunet.models.unet import BatchNorm3d, recomputing

T = TypeVar("T")

# Rank 0 validates and chooses the post-processing while the others wait in a collective: longer than
# torch's default (10 to 30 minutes) so that paper-scale validation fits. A rank that dies does not make the
# others wait this long: torchrun (or meunet train --nproc) stops them.
TIMEOUT = datetime.timedelta(hours=3)

_joined = False  # this process joined a process group (its errors are then reported by rank 0)

LAUNCHER = "MEUNET_LAUNCHER"  # set for the processes that meunet train --nproc starts (see launch)
LOST = 3  # their exit status when another process stopped: the launcher names that one


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def launched_processes() -> int:
    """The processes a launcher (torchrun) started on all machines, from ``WORLD_SIZE`` (1 without one)."""
    return _env("WORLD_SIZE", 1)


def launched() -> bool:
    """Started by torchrun (or another launcher setting ``WORLD_SIZE``) with more than one process."""
    return launched_processes() > 1


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that writes files, logs and validates."""
    return rank() == 0


def first_process() -> bool:
    """Rank 0 of a torchrun launch, or a process outside torchrun (from the environment: also before and
    after the process group)."""
    return _env("RANK", 0) == 0


def reports_errors() -> bool:
    """Whether this process prints its errors: every process outside torchrun; under torchrun rank 0 once
    the process group was joined (the others raise the same error or :class:`Elsewhere`), else local rank 0
    (errors found before joining are the same on every process of a node)."""
    if not launched():
        return True
    return first_process() if _joined else _env("LOCAL_RANK", 0) == 0


def check_batch(batch: int, processes: int, where: str = "training.batch_size") -> None:
    """Raise InputError unless ``processes`` share a global batch of ``batch`` samples evenly."""
    if batch % processes:
        raise InputError(
            where,
            f"{batch} is the global batch: {processes} processes cannot share it evenly "
            f"(make it a multiple of {processes})",
        )


def share(batch: int) -> tuple[int, int]:
    """``(first, count)``: the rows of a global batch of ``batch`` samples this process trains on.

    Rank ``r`` of ``N`` takes the contiguous rows ``r B / N .. (r + 1) B / N - 1``, so N processes see the
    samples, in the order, of one process with the whole batch.

    Raises:
        InputError: the world size does not divide ``batch`` (:func:`check_batch`).
    """
    joined = dist.is_available() and dist.is_initialized()
    n, r = (world_size(), rank()) if joined else (launched_processes(), _env("RANK", 0))
    check_batch(batch, n)
    return r * (batch // n), batch // n


def check_device(device: torch.device, processes: int, launcher: str = "torchrun") -> None:
    """Raise InputError unless ``processes`` processes of one machine can train on ``device``: the CPU, or
    CUDA with a GPU for each (not one named GPU, not MPS)."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise InputError("device", f"{device.type} trains on one process only: use cuda or cpu")
    if device.index is not None:
        raise InputError(
            "device",
            f"{device} names one GPU, but with several processes each takes the GPU of its local rank: "
            "write device: cuda (or auto)",
        )
    if processes > (gpus := torch.cuda.device_count()):
        raise InputError(
            "device", f"{launcher} starts {processes} processes on this machine, which has {gpus} GPU(s)"
        )


def process_device(device: torch.device) -> torch.device:
    """The device of this process: ``device`` outside torchrun; under torchrun the CPU, or the GPU of the
    process's local rank.

    Raises:
        InputError: :func:`check_device` with the processes torchrun started on this node (the same on
            every process of the node).
    """
    if not launched():
        return device
    check_device(device, _env("LOCAL_WORLD_SIZE", 1))
    return device if device.type == "cpu" else torch.device("cuda", _env("LOCAL_RANK", 0))


def launch(processes: int, args: list[str]) -> None:
    """Run ``python ARGS`` as ``processes`` processes of this machine under PyTorch's elastic agent, as
    ``torchrun --standalone --nproc-per-node N`` does (a rendezvous on a free local port; no restarts); when
    one fails the agent stops the others.

    Raises:
        Elsewhere: a process exited with status 2, having printed its one line (or kept silent while
            rank 0 printed it).
        InputError: a process failed otherwise (killed, crashed): names the first, and how; processes that
            only lost it (status :data:`LOST`) or that the agent then stopped (SIGTERM) come last.
    """
    import logging
    import signal
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    elastic = logging.getLogger("torch.distributed.elastic")
    level, elastic.level = elastic.level, logging.CRITICAL  # its report of a failure is the line below
    before, os.environ[LAUNCHER] = os.environ.get(LAUNCHER), "1"
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
        if any(f.exitcode == 2 for _, f in failures):
            raise Elsewhere("a process reported an error") from None
        first, failure = min(failures, key=lambda item: item[1].exitcode in (LOST, -signal.SIGTERM))
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        raise InputError(
            f"process {first}",
            f"stopped ({how}), and the others with it; the last checkpoint is kept: --resume continues",
        ) from None
    finally:
        elastic.setLevel(level)
        if before is None:
            del os.environ[LAUNCHER]
        else:
            os.environ[LAUNCHER] = before


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Join the process group for the duration of a run (when launched and not joined already), and leave it
    afterwards; the backend is NCCL for a CUDA ``device`` (made this process's current GPU), else gloo."""
    global _joined
    if not launched() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    _joined = True
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # after a lost process, leaving may fail too
            dist.destroy_process_group()


def under_launcher() -> bool:
    """Started by :func:`launch` (``meunet train --nproc``), which names a failed process itself."""
    return os.environ.get(LAUNCHER) == "1"


def lost_process(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed under torchrun because another process stopped (NCCL's
    ``DistError``, or gloo's closed connection)."""
    return launched() and (isinstance(exc, dist.DistError) or "/gloo/" in str(exc))


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if world_size() > 1:
        dist.barrier()


class _Sum(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the output gradients."""

    @staticmethod
    def forward(ctx, tensor):  # type: ignore[override]
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes, differentiable: the gradient of every rank's input is the
    sum of the ranks' output gradients (``tensor`` itself with one process)."""
    return _Sum.apply(tensor) if world_size() > 1 else tensor


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every process (picklable)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 alone and return its result on every process.

    An :class:`InputError` on rank 0 is raised again on every process (the CLI prints it once, from rank 0);
    any other exception is raised on rank 0 and as :class:`Elsewhere` on the others.
    """
    if world_size() == 1:
        return step()
    outcome: tuple[str, Any] = ("crash", None)
    try:
        if is_main():
            outcome = ("ok", step())
    except InputError as exc:
        outcome = ("error", exc)
        raise
    finally:
        outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    if outcome[0] == "crash":
        raise Elsewhere("rank 0 stopped with an error")
    return outcome[1]


def mine(tasks: list[T]) -> list[T]:
    """The tasks of this process when ``tasks`` are dealt out round robin over the processes."""
    return tasks[rank() :: world_size()]


class _SyncBatchNorm(torch.autograd.Function):
    """Batch normalisation with the mean and variance of the whole global batch (all processes' rows).

    Forward adds each channel's sum and count, then its sum of squared deviations, over the processes (two
    all-reduces, float64 sums); backward adds the sums of the output gradient and of its product with the
    centred input. Only the input is saved, as by ``torch.nn.functional.batch_norm``. The gradients of the
    weight and bias are this process's share: DistributedDataParallel adds them up.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):  # type: ignore[override]
        dims = [0, *range(2, x.ndim)]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        sums = torch.cat([x.sum(dims, dtype=torch.float64), count])
        dist.all_reduce(sums)
        n = sums[-1]
        mean64 = sums[:-1] / n
        mean = mean64.float()
        squares = (x.float() - mean.view(shape)).square().sum(dims, dtype=torch.float64)
        dist.all_reduce(squares)
        var64 = squares / n
        invstd = torch.rsqrt(var64 + eps).float()
        if factor is not None:  # not while a checkpointed segment recomputes
            running_mean.mul_(1 - factor).add_(mean64.to(running_mean.dtype), alpha=factor)
            unbiased = var64 * n / (n - 1).clamp_min(1)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = float(n)
        scale = invstd if weight is None else invstd * weight.float()
        y = (x.float() - mean.view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.ndim)]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        dy = dy.float()
        centred = x.float() - mean.view(shape)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_centred = (dy * centred).sum(dims, dtype=torch.float64)
        grad_weight = None if weight is None else (sum_dy_centred * invstd).to(weight.dtype)
        grad_bias = None if weight is None else sum_dy.to(weight.dtype)
        total = torch.cat([sum_dy, sum_dy_centred])
        dist.all_reduce(total)
        mean_dy, mean_dy_centred = (total / ctx.count).float().chunk(2)
        scale = invstd if weight is None else invstd * weight.float()
        grad = dy - mean_dy.view(shape) - centred * (invstd.square() * mean_dy_centred).view(shape)
        grad_x = (grad * scale.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm3d(BatchNorm3d):
    """:class:`meunet.models.unet.BatchNorm3d` whose training-mode statistics are those of the global batch
    over all processes (``torch.nn.SyncBatchNorm`` runs on GPUs only). Evaluation mode, and training with
    one process, are the plain layer's; state-dict keys are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        factor = None
        if not recomputing():
            self.num_batches_tracked.add_(1)
            factor = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        stats = (self.running_mean, self.running_var, factor, self.eps)
        return _SyncBatchNorm.apply(x, self.weight, self.bias, *stats)


def synchronise_batch_norm(net: nn.Module) -> nn.Module:
    """Make the trained batch-norm layers of ``net`` :class:`SyncBatchNorm3d` (in place, same weights); frozen
    ones (a cascade's stage 1) stay as they are. Nothing changes with one process."""
    if world_size() > 1:
        for module in net.modules():
            if type(module) is BatchNorm3d and module.weight is not None and module.weight.requires_grad:
                module.__class__ = SyncBatchNorm3d
    return net


def distribute(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` wrapped in ``DistributedDataParallel`` (gradients averaged over the processes; buffers are
    not broadcast, synchronised batch norm keeps them equal) after :func:`synchronise_batch_norm`; ``net``
    itself with one process."""
    if world_size() == 1:
        return net
    synchronise_batch_norm(net)
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers, which older versions need
        warnings.simplefilter("ignore", FutureWarning)
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)
