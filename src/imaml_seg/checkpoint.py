"""Checkpoints: one safetensors file holding weights, optimiser state, config and run state.

Everything needed to rebuild a run lives in a single file, so it can be replaced atomically
(written to a temporary file in the same folder, flushed, then ``os.replace``d): a crash leaves
either the old checkpoint or the new one, never half of one.  Tensors are stored under prefixes
(``theta/<name>``, ``opt/<slot>/<name>``, learned strengths ``lam/<name>``); the run config and
JSON-serialisable state go in the safetensors header metadata.  No pickle anywhere, so loading
a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imaml_seg import __version__
from imaml_seg.config import ConfigError, RunConfig, from_dict, to_dict
from imaml_seg.model import Params, build_model

FORMAT = "imaml-seg-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


@dataclass
class Checkpoint:
    """A run's weights (``theta``) with everything needed to rebuild or resume it."""

    config: RunConfig
    theta: Params
    step: int = 0
    optimizer_state: dict[str, Params] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable run state (phase, counters, metrics)."""
    lam: Params = field(default_factory=dict)
    """Learned proximal strengths, one scalar per weight tensor of ``theta`` (``meta.lam_lr``);
    empty when the run uses the one ``inner.lam``."""


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"theta/{k}": v.detach().contiguous().cpu() for k, v in checkpoint.theta.items()}
    tensors.update({f"lam/{k}": v.detach().reshape(()).cpu() for k, v in checkpoint.lam.items()})
    for slot, params in checkpoint.optimizer_state.items():
        tensors.update(
            {f"opt/{slot}/{k}": v.detach().contiguous().cpu() for k, v in params.items()}
        )
    metadata = {
        "format": FORMAT,
        "version": __version__,
        "config": json.dumps(to_dict(checkpoint.config)),
        "step": str(checkpoint.step),
        "state": json.dumps(checkpoint.state),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint, checking that its weights fit the architecture its config describes."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an imaml-seg checkpoint (format {metadata.get('format')})"
        )
    try:
        config = from_dict(json.loads(metadata["config"]), where=f"{path} config")
        step = int(metadata.get("step", "0"))
        state = json.loads(metadata.get("state", "{}"))
    except (KeyError, ValueError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({err})") from None
    theta = {k[len("theta/") :]: v for k, v in tensors.items() if k.startswith("theta/")}
    order = check_architecture(theta, config, path)
    optimizer_state: dict[str, Params] = {}
    for key in tensors:
        if key.startswith("opt/"):
            optimizer_state.setdefault(key.split("/", 2)[1], {})
    # safetensors sorts names; restore the model's order, which fixes summation order downstream
    theta = {k: theta[k] for k in order}
    try:
        optimizer_state = {s: {k: tensors[f"opt/{s}/{k}"] for k in order} for s in optimizer_state}
    except KeyError as err:
        raise CheckpointError(f"{path}: optimiser state lacks {err}") from None
    lam = {k[len("lam/") :]: v for k, v in tensors.items() if k.startswith("lam/")}
    if lam:
        if set(lam) != set(order) or any(v.dim() != 0 for v in lam.values()):
            raise CheckpointError(
                f"{path}: learned proximal strengths (lam/) must be one scalar per weight tensor"
            )
        if not all(bool(torch.isfinite(v) and v > 0) for v in lam.values()):
            raise CheckpointError(f"{path}: a learned proximal strength is not a positive number")
        lam = {k: lam[k] for k in order}
    return Checkpoint(config, theta, step, optimizer_state, state, lam)


def check_architecture(
    theta: Params, config: RunConfig, path: str | Path = "checkpoint"
) -> list[str]:
    """Raise CheckpointError unless ``theta`` has exactly the model's names and shapes.

    Returns the model's parameter names in its own order."""
    expected = {k: tuple(p.shape) for k, p in build_model(config.model).named_parameters()}
    found = {k: tuple(v.shape) for k, v in theta.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch in {wrong[:3]}"
        if not missing and not wrong:
            detail = f"unexpected {sorted(set(found) - set(expected))[:3]}"
        raise CheckpointError(
            f"{path}: weights do not fit the model features {config.model.features} ({detail})"
        )
    for name, value in theta.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: weight '{name}' holds NaN or Inf")
    return list(expected)


def blend_with_start(theta: Params, config: RunConfig) -> Params:
    """The weights a warm-started run adapts from: ``theta`` with ``config.eval.start_blend``
    (``b``) of its start's weights mixed in, ``(1 - b) theta + b theta_start``.

    Meta-training from a start (iMAML from transfer's weights) stays near it, and points on the
    straight line between the two can keep what each end does well and vary less over training
    seeds than either (weight-space ensembling: Wortsman et al., "Robust fine-tuning of zero-shot
    models", CVPR 2022).  ``b = 0`` returns ``theta`` itself; the start is read from the
    checkpoint ``config.meta.warm_start`` names."""
    b = config.eval.start_blend
    if b == 0:
        return theta
    path = config.meta.warm_start
    if path is None:
        raise ConfigError(
            f"eval.start_blend = {b} mixes in the weights a run was warm-started from, and this "
            f"{config.meta.algorithm} run has none (meta.warm_start is unset)"
        )
    if not Path(path).is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found; eval.start_blend needs the weights this run was "
            "warm-started from (meta.warm_start) where its config names them"
        )
    start = load_checkpoint(path).theta
    if start.keys() != theta.keys() or any(start[k].shape != theta[k].shape for k in theta):
        raise CheckpointError(
            f"{path}: the warm start's weights do not fit the run's model (eval.start_blend)"
        )
    return {k: torch.lerp(v, start[k].to(v), b) for k, v in theta.items()}
