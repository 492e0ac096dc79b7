"""Patch-based training of both stages from a YAML configuration (docs/method.md section 4), resumable.

- :func:`load_config` / :class:`TrainConfig`: the validated configuration (``docs/config.md``).
- :func:`train`: stage 1, stage 2 or both into one model directory.
"""

from meunet.train.config import TrainConfig, load_config, parse_config
from meunet.train.pipeline import train

__all__ = ["TrainConfig", "load_config", "parse_config", "train"]
