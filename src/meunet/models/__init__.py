"""Networks of docs/method.md sections 1-3 and 6, and the model directory.

- :class:`UNet3D`: the backbone U-net (also the plain baselines).
- :class:`MeUNet`: stage 1, local and context paths with shared weights.
- :class:`Cascade`: frozen stage 1 + stage-2 U-net, post- or pre-concatenation.
- :func:`save_model_dir`, :func:`load_model_dir`, :class:`ModelBundle`: ``model.json`` + ``stage*.pt``.
"""

from meunet.models.bundle import ModelBundle, load_model_dir, save_model_dir
from meunet.models.cascade import Cascade, build_cascade, stage1_fill
from meunet.models.meunet import MeUNet, context_side
from meunet.models.unet import PAPER_WIDTHS, BatchNorm3d, ConvStage, UNet3D, crop_to, pad_to_multiple

__all__ = [
    "PAPER_WIDTHS",
    "BatchNorm3d",
    "Cascade",
    "ConvStage",
    "MeUNet",
    "ModelBundle",
    "UNet3D",
    "build_cascade",
    "context_side",
    "crop_to",
    "load_model_dir",
    "pad_to_multiple",
    "save_model_dir",
    "stage1_fill",
]
