"""The two-stage cascade of docs/method.md section 3: frozen stage 1, stage 2 joined by post- or
pre-concatenation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meunet.models.unet import ConvStage, UNet3D, lean, run_consuming

FUSIONS = ("post", "pre")
STAGE1_OUTPUTS = ("probs", "features")


def stage1_fill(channels: int, stage1_output: str = "probs") -> tuple[float, ...]:
    """The stage-1 output stage 2 sees past a volume's border, per channel: certain background (one-hot
    class 0) for probabilities, zeros for features. Training pads its patches and warps with it, and every
    prediction path pads its windows with it.

    >>> stage1_fill(3)
    (1.0, 0.0, 0.0)
    """
    return (1.0,) + (0.0,) * (channels - 1) if stage1_output == "probs" else (0.0,) * channels


class Cascade(nn.Module):
    """Stage 1 (frozen: no gradient, always in eval mode) followed by a stage-2 U-net.

    ``fusion="post"`` (the method): stage 2's last decoder features (N, w0, Z, Y, X) are concatenated with the
    stage-1 output, then one :class:`ConvStage` (``fuse``) and stage 2's own 1x1x1 head. ``fusion="pre"`` (the
    ablation): the stage-1 output is stacked onto the image as extra input channels of stage 2, whose
    ``in_channels`` must then be image channels + :attr:`stage1_channels`.

    ``stage1_output="probs"``: stage 1's softmax probabilities (n_classes channels); ``"features"``: its last
    decoder features (w0 channels). :attr:`stage1_channels` says how many, for caching.

    Args:
        stage1: trained stage 1 (a :class:`MeUNet`, or a plain :class:`UNet3D` baseline); frozen here.
        stage2: the stage-2 U-net.
        fusion: ``"post"`` or ``"pre"``.
        stage1_output: ``"probs"`` or ``"features"``.
    """

    def __init__(self, stage1: UNet3D, stage2: UNet3D, fusion: str = "post", stage1_output: str = "probs"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
        if stage1_output not in STAGE1_OUTPUTS:
            raise ValueError(f"stage1_output must be one of {STAGE1_OUTPUTS}, not {stage1_output!r}")
        self.fusion = fusion
        self.stage1_output = stage1_output
        self.stage1 = stage1.requires_grad_(False).eval()
        self.stage2 = stage2
        self.stage1_channels = (
            stage1.spec["n_classes"] if stage1_output == "probs" else stage1.feature_channels
        )
        image_channels = stage1.spec["in_channels"]
        expected = image_channels + (self.stage1_channels if fusion == "pre" else 0)
        if stage2.spec["in_channels"] != expected:
            raise ValueError(f"{fusion} fusion needs a stage 2 with {expected} input channels")
        if fusion == "post":
            self.fuse = ConvStage(
                stage2.feature_channels + self.stage1_channels, stage2.feature_channels, stage2.spec["norm"]
            )

    @property
    def spec(self) -> dict[str, Any]:
        """Constructor kwargs of stage 2 and the fusion, as stored in ``model.json`` under ``stage2``."""
        return {**self.stage2.spec, "fusion": self.fusion, "stage1_output": self.stage1_output}

    def train(self, mode: bool = True) -> Cascade:
        """Set stage 2 (and the fusion) to training mode; stage 1 stays in eval mode."""
        super().train(mode)
        self.stage1.eval()
        return self

    @torch.no_grad()
    def stage1_forward(self, image: torch.Tensor) -> torch.Tensor:
        """Stage-1 output (N, stage1_channels, Z, Y, X) float of an image (N, C_in, Z, Y, X), without grad."""
        features = self.stage1.features(image)
        if self.stage1_output == "features":
            return features
        return torch.softmax(self.stage1.head(features), dim=1)

    def forward(self, image: torch.Tensor, stage1_maps: torch.Tensor | None = None) -> torch.Tensor:
        """Final logits (N, n_classes, Z, Y, X) of an image (N, C_in, Z, Y, X).

        ``stage1_maps`` (N, stage1_channels, Z, Y, X), e.g. cached float16 probabilities, is used when given
        (cast to the image's dtype); otherwise it is computed by :meth:`stage1_forward`.
        """
        s1 = self.stage1_forward(image) if stage1_maps is None else stage1_maps.to(image.dtype)
        if self.fusion == "pre":
            return self.stage2(torch.cat([image, s1], dim=1))
        features = self.stage2.features(image)
        if lean():  # the concatenation freed after the first conv, norms in place
            box = [torch.cat([features, s1.to(features.dtype)], dim=1)]
            del features, s1
            return self.stage2.head(run_consuming(self.fuse, box)).contiguous()
        return self.stage2.head(self.stage2.run_stage(self.fuse, torch.cat([features, s1], dim=1)))


def build_cascade(stage1: UNet3D, spec: dict[str, Any]) -> Cascade:
    """A :class:`Cascade` from its :attr:`Cascade.spec` dict (``model.json``'s ``stage2``) and stage 1."""
    spec = dict(spec)
    fusion, stage1_output = spec.pop("fusion"), spec.pop("stage1_output")
    return Cascade(stage1, UNet3D(**spec), fusion, stage1_output)
