"""The backbone 3D U-net of docs/method.md section 1, with optional per-stage activation checkpointing.

Tensors are (N, C, Z, Y, X). Inputs of any spatial size are accepted: they are zero-padded at the high end of
each axis up to the next multiple of 16 (four max-pools of 2) and the outputs are cropped back, so that every
nearest-neighbour upsampling is an exact doubling and a window's prediction does not depend on its size.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PAPER_WIDTHS = (16, 32, 64, 128, 128)
MULTIPLE = 16  # 2 ** number of max-pools

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


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that leaves bf16 autocast on a CPU for inputs with a side smaller than the kernel.

    torch 2.13's CPU bf16 convolution returns wrong weight gradients (up to 1e33, 60 % of the calls) when a
    spatial side is smaller than the kernel, as at the 2^3 bottleneck of a 32^3 patch: training in bf16
    diverged to a non-finite loss within 150 steps. Such maps are tiny, so float32 costs nothing there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_bf16 = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_bf16 and min(x.shape[2:]) < max(self.kernel_size):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
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
            Conv3d(c_in, c_out, 3, padding=1),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
            Conv3d(c_out, c_out, 3, padding=1),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


CHANNELS_LAST = torch.channels_last_3d
# parity a of an output voxel along one axis -> how the 3 taps of a kernel over a nearest-2x upsampled map
# fall on the 2 low-resolution voxels p - 1 + a and p + a: rows are the 2 taps, columns the kernel's 3 taps
_PARITY_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def lean() -> bool:
    """Whether forward passes take the lean path (:meth:`UNet3D.lean_features`): gradients off, and not
    being traced (an ONNX export traces the plain path, whose graph does not depend on the input size)."""
    return not torch.is_grad_enabled() and not torch.jit.is_tracing()


def run_consuming(stage: nn.Sequential, box: list[torch.Tensor]) -> torch.Tensor:
    """A :class:`ConvStage` (or any sequence of a conv, norms, ReLUs and convs) applied without gradients to
    the one tensor in ``box``, which it takes out: with no other reference left, the input is freed once the
    first conv has run. See :func:`lean_conv` and :func:`lean_module`."""
    h = lean_conv(box.pop(), stage[0].weight, stage[0].bias)
    for module in list(stage)[1:]:
        h = lean_module(module, h)
    return h


def lean_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3x3 conv with padding 1 of ``x`` as a channels-last map (``torch.channels_last_3d``).

    oneDNN convolves channels-last maps in place of its output; a channels-first map gets a reordered copy
    of its input or output (measured on CPU at 160³: 16 -> 16 channels peaked at two outputs, channels-last
    at one, and ran 20 % faster). A one-channel input cannot be told apart from a channels-last one, and its
    conv's copies came to 1.7 outputs: it is convolved a sixteenth of the depth at a time into the output.
    """
    if x.shape[1] > 1:
        out = F.conv3d(x.contiguous(memory_format=CHANNELS_LAST), weight, bias, padding=1)
        return out.contiguous(memory_format=CHANNELS_LAST)
    depth = x.shape[2]
    step = max(1, -(-depth // 16))
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))
    out = None
    for z0 in range(0, depth, step):
        z1 = min(z0 + step, depth)
        part = F.conv3d(padded[:, :, z0 : z1 + 2], weight, bias, padding=(0, 1, 1))
        if out is None:
            out = torch.empty(
                (x.shape[0], part.shape[1], *x.shape[2:]), dtype=part.dtype, device=part.device,
                memory_format=CHANNELS_LAST,
            )  # fmt: skip
        out[:, :, z0:z1] = part
    return out


def lean_module(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``module(h)`` without gradients, in place on ``h`` where ``module`` is a ReLU, an instance norm without
    running statistics or a batch norm in eval mode (a scale and a shift per channel); a conv through
    :func:`lean_conv` (3x3x3, padding 1); anything else (a batch norm in training mode) as itself."""
    if isinstance(module, nn.ReLU):
        return h.relu_()
    if isinstance(module, nn.Conv3d) and module.kernel_size == (3, 3, 3) and module.padding == (1, 1, 1):
        return lean_conv(h, module.weight, module.bias)
    if isinstance(module, nn.InstanceNorm3d) and not module.track_running_stats:
        var, mean = torch.var_mean(h, dim=(2, 3, 4), keepdim=True, correction=0)
        scale = (var.float() + module.eps).rsqrt()
        shift = -mean.float() * scale
        if module.affine:
            weight = module.weight.view(1, -1, 1, 1, 1)
            scale, shift = scale * weight, shift * weight + module.bias.view(1, -1, 1, 1, 1)
    elif isinstance(module, nn.BatchNorm3d) and not module.training and module.running_var is not None:
        scale = (module.running_var + module.eps).rsqrt()
        shift = -module.running_mean * scale
        if module.affine:
            scale, shift = scale * module.weight, shift * module.weight + module.bias
        scale, shift = scale.view(1, -1, 1, 1, 1), shift.view(1, -1, 1, 1, 1)
    else:
        return module(h)
    # in h's dtype: with float32 factors a bf16 map gets float32 temporaries (4x its size, measured)
    return torch.addcmul(shift.to(h.dtype), h, scale.to(h.dtype), out=h)


def decode_consuming(
    stage: nn.Sequential, skips: list[torch.Tensor], box: list[torch.Tensor]
) -> torch.Tensor:
    """A decoder stage without gradients: ``stage(cat([skip, upsample(deep)]))`` for the last skip of
    ``skips`` and the deeper output in ``box`` (both taken out and freed once used), with neither the
    concatenation nor the upsampled map ever made.

    The first conv is split along its input channels: the skip's part runs at full resolution; the deeper
    map's part, a 3x3x3 conv over a nearest 2x upsampling, equals per parity of the output voxel (8 of them)
    a 2x2x2 conv of the low-resolution map with the kernel's taps summed as they fall on it, run at low
    resolution and added into every second voxel. The stage then holds the skip, its output and the small
    deeper map, where the concatenation held three maps of the skip's width; equal to the training path up
    to float rounding (the sizes are exact doublings, as padding makes them).
    """
    conv, skip = stage[0], skips.pop()
    c = skip.shape[1]
    h = lean_conv(skip, conv.weight[:, :c], conv.bias)
    del skip
    deep = box.pop()
    weight = conv.weight[:, c:]
    taps = _PARITY_TAPS.to(weight)
    z, y, x = deep.shape[2:]
    for a, b, d in itertools.product((0, 1), repeat=3):
        kernel = torch.einsum("ui,vj,wk,ocijk->ocuvw", taps[a], taps[b], taps[d], weight)
        out = F.conv3d(deep, kernel, padding=1)[:, :, a : a + z, b : b + y, d : d + x]
        h[:, :, a::2, b::2, d::2] += out
        del out
    del deep
    for module in list(stage)[1:]:
        h = lean_module(module, h)
    return h


def pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> torch.Tensor:
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
        """Last decoder features (after the top decoder stage): (N, C_in, Z, Y, X) -> (N, w0, Z, Y, X).

        Without gradients (``torch.no_grad``, ``torch.inference_mode``; :func:`lean`) this is
        :meth:`lean_features`: the same function, computed in less memory, channels-last.
        """
        size = x.shape[2:]
        if lean():
            return crop_to(self.lean_features(pad_to_multiple(x)), size)
        top, x1 = self.run_stage(self.down, 0, pad_to_multiple(x))
        return crop_to(self.run_stage(self.up, 0, top, self.inner(x1)), size)

    def lean_features(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` of an input whose sizes are multiples of 16, for use without gradients, holding
        each map only while something needs it.

        Encoder stages run through :func:`run_consuming` (the input freed after the first conv, norms and
        ReLUs in place, maps channels-last), decoder stages through :func:`decode_consuming` (no
        concatenation, no upsampled map); each skip is dropped by the decoder level that uses it. The peak
        is about two maps of the top width, at the top level: a conv's input and output. Equal to the
        training path up to float rounding; channels-last (``torch.channels_last_3d``).
        """
        skips: list[torch.Tensor] = []
        box = [x]
        for level in range(4):
            skip = run_consuming(self.encoders[level], box)
            with torch.autocast(skip.device.type, enabled=False):  # CPU autocast pools a bf16 map in float32
                box = [F.max_pool3d(skip, 2)]
            skips.append(skip)
            del skip
        box = [run_consuming(self.encoders[4], box)]
        for level in range(3, -1, -1):
            box = [decode_consuming(self.decoders[level], skips, box)]
        return box.pop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes, Z, Y, X) of an image (N, C_in, Z, Y, X), contiguous.

        Without gradients the features are channels-last (:meth:`lean_features`) and the head runs on them
        as they are (made contiguous first, a bf16 head's reorder peaked at 1.7 maps against 1.2)."""
        logits = self.head(self.features(x))
        return logits.contiguous() if lean() else logits
