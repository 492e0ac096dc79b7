"""The model directory (docs/architecture.md): ``model.json``, ``stage1.pt``, optionally ``stage2.pt``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meunet.errors import InputError
from meunet.io import atomic_output, check_new_output, write_json
from meunet.models.cascade import Cascade, build_cascade
from meunet.models.meunet import MeUNet
from meunet.models.unet import UNet3D

FORMAT_VERSION = 1
# model.json's stage1.architecture: the meU-net, or a plain U-net (the baselines of docs/method.md section 6).
STAGE1_ARCHITECTURES = {"meunet": MeUNet, "unet": UNet3D}


@dataclass
class ModelBundle:
    """A loaded model directory, modules in eval mode on the requested device.

    Attributes:
        meta: the parsed ``model.json`` (``normalization``, ``window``, ``patch`` ...).
        stage1: the meU-net, or a plain :class:`UNet3D` (``stage1.architecture`` ``"unet"``).
        cascade: the whole cascade (stage 1 inside, frozen; its stage 2 from ``stage2.pt``) or None for a
            stage-1-only model.
        classes: class names, index = label value.
    """

    meta: dict[str, Any]
    stage1: UNet3D
    cascade: Cascade | None
    classes: list[str]

    def net(self, image: torch.Tensor, stage1_maps: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, n_classes, Z, Y, X) of the final stage for a normalised image window (N, C_in, Z, Y, X).

        ``stage1_maps`` (N, cascade.stage1_channels, Z, Y, X), e.g. cached probabilities, is only used by a
        cascade; a stage-1-only model ignores it.
        """
        if self.cascade is None:
            return self.stage1(image)
        return self.cascade(image, stage1_maps)


def _state_dict_cpu(module: torch.nn.Module, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu()
        for k, v in module.state_dict().items()
        if skip_prefix is None or not k.startswith(skip_prefix)
    }


def save_model_dir(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    stage1: UNet3D,
    stage2: Cascade | None = None,
    force: bool = False,
) -> Path:
    """Write a model directory; each file goes to a temporary name first and is renamed into place.

    ``meta`` becomes ``model.json`` with ``format_version``, ``in_channels``, ``stage1`` (= ``stage1.spec``
    plus ``architecture``: ``"meunet"`` for a :class:`MeUNet`, ``"unet"`` for a plain :class:`UNet3D`)
    and ``stage2`` (= ``stage2.spec`` or null) filled in from the modules; the rest (``classes``,
    ``normalization``, ``patch``, ``window`` ...) is the caller's. ``stage2.pt`` holds the cascade's weights
    without stage 1's. ``model.json`` is written last.

    Raises:
        InputError: ``path`` holds a model already and ``force`` is False, or is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a directory")
    check_new_output(path / "model.json", force)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "in_channels": stage1.spec["in_channels"],
        "stage1": {**stage1.spec, "architecture": "meunet" if isinstance(stage1, MeUNet) else "unet"},
        "stage2": None if stage2 is None else stage2.spec,
    }
    files = {"stage1.pt": _state_dict_cpu(stage1)}
    if stage2 is not None:
        files["stage2.pt"] = _state_dict_cpu(stage2, skip_prefix="stage1.")
    for name, state in files.items():
        with atomic_output(path / name) as tmp:
            with open(tmp, "wb") as f:  # a file object: the bytes do not depend on the temporary name
                torch.save(state, f)
    write_json(path / "model.json", meta, force=force)
    if stage2 is None:
        (path / "stage2.pt").unlink(missing_ok=True)
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / "model.json"
    if not file.is_file():
        raise InputError(file, "missing: not a meunet model directory")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(file, f"unreadable: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("stage1"), dict):
        raise InputError(file, "no 'stage1' architecture")
    version = meta.get("format_version", FORMAT_VERSION)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise InputError(
            file,
            f"'format_version' {version!r} is not one this meunet reads (1 to {FORMAT_VERSION}): written by "
            "a newer meunet?",
        )
    spacing = meta.get("spacing")
    if spacing is not None and not (
        isinstance(spacing, list)
        and len(spacing) == 3
        and all(type(s) in (int, float) and 0 < s < math.inf for s in spacing)
    ):
        raise InputError(file, f"'spacing' must be three positive finite numbers (mm), got {spacing!r}"[:300])
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != meta["stage1"].get("n_classes"):
        raise InputError(file, "'classes' must list one name per output class")
    if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise InputError(file, f"'classes' must be distinct non-empty names, got {classes!r}"[:300])
    if meta.get("stage2") is not None and not isinstance(meta["stage2"], dict):
        raise InputError(file, "'stage2' must be null or an architecture")
    window = meta.get("window")
    if window is not None and not (
        isinstance(window, list) and len(window) == 3 and all(type(w) is int and w > 0 for w in window)
    ):
        raise InputError(file, f"'window' must be three positive integers (z, y, x), got {window!r}")
    rules = meta.get("postprocessing") or {}
    if not isinstance(rules, dict) or not all(_is_rule(k, r, len(classes)) for k, r in rules.items()):
        raise InputError(
            file,
            "'postprocessing' must map foreground class indices to {\"largest_component\": true} or "
            f'{{"min_size": N}}, got {rules!r}'[:300],
        )
    return meta


def _is_rule(key: str, rule: Any, n_classes: int) -> bool:
    """Whether ``key: rule`` is a post-processing rule of :mod:`meunet.infer.postprocess`."""
    if not (key.isdigit() and 0 < int(key) < n_classes and isinstance(rule, dict)):
        return False
    if list(rule) == ["largest_component"]:
        return rule["largest_component"] is True
    return list(rule) == ["min_size"] and type(rule["min_size"]) is int and rule["min_size"] > 0


def _load_state(
    file: Path, module: torch.nn.Module, device: str | torch.device, skip_prefix: str | None = None
):
    if not file.is_file():
        raise InputError(file, "missing")
    state = load_tensors(file, device)
    load_matching(file, module, state, skip_prefix)


def load_tensors(file: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: a dict of tensors and plain values, never code.

    Raises:
        InputError: truncated or not a torch file, objects other than tensors and plain values (refused
            unpickling: a pickle can run code), or not a dict (one line).
    """
    try:
        with warnings.catch_warnings():  # torch warns, on stderr, about the opcodes it refuses
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            file,
            "holds objects other than tensors and plain values: refused (unpickling them could run code)",
        ) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(file, f"unreadable as torch weights: {first}") from None
    if not isinstance(state, dict):
        raise InputError(file, "not a state dict")
    return state


def load_matching(file: Path, module: torch.nn.Module, state: dict, skip_prefix: str | None = None) -> None:
    """Load ``state`` into ``module``; InputError (one line: what differs, the first case of each) unless
    every tensor is there with its shape (keys under ``skip_prefix`` may be missing)."""
    own = module.state_dict()
    wrong = [k for k in state if k in own and getattr(state[k], "shape", None) != own[k].shape]
    missing = [k for k in own if k not in state and not (skip_prefix and k.startswith(skip_prefix))]
    unexpected = [k for k in state if k not in own]
    parts = []
    if wrong:
        k = wrong[0]
        shape = tuple(getattr(state[k], "shape", ()))
        parts.append(
            f"{len(wrong)} of another shape (first {k}: {shape}, the architecture's {tuple(own[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if parts:
        raise InputError(file, "tensors do not match model.json's architecture: " + "; ".join(parts))
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    broken = [k for k, v in floats.items() if not torch.isfinite(v).all()]
    broken += [k for k, v in floats.items() if k.endswith("running_var") and (v < 0).any()]
    if broken:
        raise InputError(
            file, f"{len(broken)} tensors hold NaN, infinite or negative-variance values (first {broken[0]})"
        )
    module.load_state_dict(state, strict=False)


def load_model_dir(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelBundle:
    """Load a model directory written by :func:`save_model_dir` (weights with ``weights_only=True``).

    Raises:
        InputError: missing directory, missing or corrupt ``model.json`` or ``.pt`` file, or weights that do
            not fit the architecture in ``model.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "model directory not found")
    meta = _read_meta(path)
    for stage in ("stage1", "stage2"):
        widths = (meta.get(stage) or {}).get("widths", [1])
        if not (
            isinstance(widths, list) and widths and all(type(w) is int and 1 <= w <= 4096 for w in widths)
        ):
            raise InputError(
                path / "model.json", f"'{stage}.widths' must be integers from 1 to 4096, got {widths!r}"[:300]
            )
    try:
        spec = dict(meta["stage1"])
        architecture = spec.pop("architecture", "meunet")
        if architecture not in STAGE1_ARCHITECTURES:
            raise ValueError(f"stage1.architecture must be one of {sorted(STAGE1_ARCHITECTURES)}")
        stage1 = STAGE1_ARCHITECTURES[architecture](**spec)
        stage2 = None if meta.get("stage2") is None else build_cascade(stage1, meta["stage2"])
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(path / "model.json", f"bad architecture: {exc}") from None
    _load_state(path / "stage1.pt", stage1, device)
    if stage2 is not None:
        _load_state(path / "stage2.pt", stage2, device, skip_prefix="stage1.")
    stage1.to(device).eval()
    if stage2 is not None:
        stage2.to(device).eval()
    return ModelBundle(meta=meta, stage1=stage1, cascade=stage2, classes=list(meta["classes"]))


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files a model directory's predictions depend on: its weights and ``model.json``."""
    path = Path(path)
    return [*sorted(path.glob("*.pt")), path / "model.json"]


def model_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model directory's weights and ``model.json`` (names and bytes), to tell models apart."""
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
