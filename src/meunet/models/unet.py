"""The backbone 3D U-net of docs/method.md section 1, with optional per-stage activation checkpointing.

Tensors are (N, C, Z, Y, X). Inputs of any spatial size are accepted: they are zero-padded at the high end of
each axis up to the next multiple of 16 (four max-pools of 2) and the outputs are cropped back, so that every
nearest-neighbour upsampling is an exact doubling and a window's prediction does not depend on its size.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PAPER_WIDTHS = (16, 32, 64, 128, 128)
_MULTIPLE = 16  # 2 ** number of max-pools

_recompute = threading.local()


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    """Mark the current thread as recomputing a checkpointed segment (BatchNorm then keeps its statistics)."""
    before = getattr(_recompute, "active", False)
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = before


def recomputing() -> bool:
    """Whether the current thread is recomputing a checkpointed segment."""
    return getattr(_recompute, "active", False)


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputing()


class BatchNorm3d(nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that leaves its running statistics alone while a checkpoint recomputes.

    Recomputation in backward repeats the forward pass; a plain BatchNorm would update its running mean and
    variance a second time. During recomputation this one normalises with the batch statistics (exactly what
    training mode does) and updates copies of the running buffers, never the buffers themselves. State-dict
    keys equal ``nn.BatchNorm3d``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and recomputing():
            # Throw-away copies of the buffers: same saved tensors as the first pass, buffers untouched.
            stats = (self.running_mean.clone(), self.running_var.clone())
            return F.batch_norm(x, *stats, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be 'batch' or 'instance', not {kind!r}")


class ConvStage(nn.Sequential):
    """Two [3x3x3 conv (padding 1) -> norm -> ReLU]: (N, c_in, Z, Y, X) -> (N, c_out, Z, Y, X)."""

    def __init__(self, c_in: int, c_out: int, norm: str = "batch") -> None:
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, padding=1),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


def pad_to_multiple(x: torch.Tensor, multiple: int = _MULTIPLE) -> torch.Tensor:
    """Zero-pad (N, C, Z, Y, X) at the high end of Z, Y, X to multiples of ``multiple`` (no copy if none)."""
    pads = [(-s) % multiple for s in x.shape[2:]]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (N, C, Z, Y, X) to the first ``size`` = (z, y, x) voxels of each spatial axis."""
    return x[..., : size[0], : size[1], : size[2]]


class UNet3D(nn.Module):
    """3D U-net (docs/method.md section 1): five levels, four max-pools of 2, two conv stages per level, a
    1x1x1 head.

    Encoder widths ``widths`` = (w0, w1, w2, w3, w4) (w4: bottleneck), decoder widths (w2, w1, w0, w0), skips
    concatenated as [skip, upsampled]. Paper widths with 1 input and 3 classes: 2,512,515 parameters.

    Args:
        in_channels: image channels C_in.
        n_classes: output channels (logits), one per class.
        widths: five encoder widths, top level first.
        norm: ``"batch"`` (BatchNorm, safe under checkpointing) or ``"instance"`` (for batches of 1 to 2).
        checkpointing: recompute every conv stage in backward (non-reentrant ``torch.utils.checkpoint``)
            instead of keeping its activations; only active while gradients are enabled.

    Shapes: input (N, C_in, Z, Y, X) float of any size (padded internally to multiples of 16, see module
    docstring); logits (N, n_classes, Z, Y, X).
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        widths: Sequence[int] = PAPER_WIDTHS,
        norm: str = "batch",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        w = tuple(int(v) for v in widths)
        if len(w) != 5:
            raise ValueError(f"widths must have 5 entries (one per level), not {len(w)}")
        self.spec = {
            "in_channels": int(in_channels),
            "n_classes": int(n_classes),
            "widths": list(w),
            "norm": norm,
            "checkpointing": bool(checkpointing),
        }
        self.checkpointing = checkpointing
        self.feature_channels = w[0]
        self.encoders = nn.ModuleList(
            ConvStage(c_in, c_out, norm) for c_in, c_out in zip((in_channels, *w[:4]), w, strict=True)
        )
        # decoders[i] works at level i (0 = full resolution); its input is [skip w_i, upsampled deeper].
        dec_out = (w[0], w[0], w[1], w[2])
        dec_up = (dec_out[1], dec_out[2], dec_out[3], w[4])
        self.decoders = nn.ModuleList(ConvStage(w[i] + dec_up[i], dec_out[i], norm) for i in range(4))
        self.head = nn.Conv3d(w[0], n_classes, 1)

    def run_stage(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, checkpointed when ``checkpointing`` is on and gradients are enabled.

        Checkpointing keeps only ``fn``'s tensor arguments and recomputes the rest in backward.
        """
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(
                fn, *args, use_reentrant=False, preserve_rng_state=False, context_fn=_checkpoint_contexts
            )
        return fn(*args)

    def down(self, level: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder stage ``level`` (0 = top) and max-pool: returns (skip, pooled)."""
        skip = self.encoders[level](x)
        return skip, F.max_pool3d(skip, 2)

    def up(self, level: int, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """Decoder stage ``level``: nearest upsampling of ``deep`` to ``skip``'s size, [skip, up], conv stage.

        Run as one checkpointed segment, it keeps only ``skip`` (kept anyway) and the small ``deep``, not the
        concatenation.
        """
        return self.decoders[level](torch.cat([skip, F.interpolate(deep, size=skip.shape[2:])], dim=1))

    def inner(self, x1: torch.Tensor) -> torch.Tensor:
        """Levels 2 to 5 and the decoder down to level 2.

        Args:
            x1: max-pooled top-level features (N, w0, Z/2, Y/2, X/2), sizes multiples of 8.
        Returns:
            level-2 decoder features (N, w0, Z/2, Y/2, X/2).
        """
        skips = []
        h = x1
        for level in range(1, 4):
            skip, h = self.run_stage(self.down, level, h)
            skips.append(skip)
        h = self.run_stage(self.encoders[4], h)
        for level in range(3, 0, -1):
            h = self.run_stage(self.up, level, skips[level - 1], h)
        return h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder features (after the top decoder stage): (N, C_in, Z, Y, X) -> (N, w0, Z, Y, X)."""
        size = x.shape[2:]
        top, x1 = self.run_stage(self.down, 0, pad_to_multiple(x))
        return crop_to(self.run_stage(self.up, 0, top, self.inner(x1)), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes, Z, Y, X) of an image (N, C_in, Z, Y, X)."""
        return self.head(self.features(x))
