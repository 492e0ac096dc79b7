"""Stage 1: the memory-efficient U-net (docs/method.md section 2): local and context paths, shared weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meunet.models.unet import UNet3D, crop_to, pad_to_multiple


def context_side(side: int, scale: float = 1.5) -> int:
    """Side of the context patch around a local patch of ``side`` voxels: about ``scale`` times it, with
    the same centre (an even margin, the same on both sides).

    >>> context_side(160), context_side(34)
    (240, 50)
    """
    return side + 2 * round(side * (scale - 1) / 2)


class MeUNet(UNet3D):
    """meU-net: one :class:`UNet3D` applied to a local patch and to a larger context patch.

    The local path is the full U-net with its full-resolution head. The context path runs the top level (first
    conv stage and first max-pool) without gradient, levels 2 to 5 and the decoder down to level 2 with
    checkpointing (when ``checkpointing``), skips the top decoder level and predicts at half resolution with a
    separate 1x1x1 head (``context_head``). At inference (``context=None``) only the local path runs, so the
    module is used like a :class:`UNet3D` (``features``, ``head``).

    Args: as :class:`UNet3D` (``widths``, ``norm``, ``checkpointing`` by keyword); ``checkpointing`` defaults
    to True.
    """

    def __init__(self, in_channels: int, n_classes: int, **kwargs: Any) -> None:
        kwargs.setdefault("checkpointing", True)
        super().__init__(in_channels, n_classes, **kwargs)
        self.context_head = nn.Conv3d(self.feature_channels, n_classes, 1)

    def context_logits(self, context: torch.Tensor) -> torch.Tensor:
        """Half-resolution logits of a context patch.

        Args:
            context: (N, C_in, Z, Y, X) float, any size.
        Returns:
            (N, n_classes, ceil(Z/2), ceil(Y/2), ceil(X/2)): compare with the context labels taken at every
            second voxel (``labels[..., ::2, ::2, ::2]``).
        """
        size = [(s + 1) // 2 for s in context.shape[2:]]
        with torch.no_grad():
            _, x1 = self.down(0, pad_to_multiple(context))
        return crop_to(self.context_head(self.inner(x1)), size)

    def forward(
        self, local: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Local logits (N, n_classes, Z, Y, X) of ``local`` (N, C_in, Z, Y, X); with ``context`` given, the
        pair (local logits, :meth:`context_logits` of ``context``)."""
        logits = super().forward(local)
        if context is None:
            return logits
        return logits, self.context_logits(context)
