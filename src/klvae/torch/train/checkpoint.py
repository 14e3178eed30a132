"""Training checkpoints: one ``step-XXXXXXXXX.pt`` file per save, written atomically, plus a ``latest`` pointer.

A checkpoint holds the model config and weights, the EMA weights, both optimisers, the loss module (logvar,
discriminator) and the step. Batches and noise are functions of (seed, step), so nothing else is needed to
continue the exact same run.
"""

from __future__ import annotations

import glob
import io
import os
import re

import torch

from klvae.errors import KLVAEError
from klvae.fileio import atomic_write_bytes

LATEST = "latest"
_NAME = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(KLVAEError):
    """A checkpoint is missing or unreadable."""


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(output_dir: str, step: int, state: dict, keep: int = 2) -> str:
    """Write ``state`` as the checkpoint of ``step``; point ``latest`` at it; keep the newest ``keep`` files."""
    folder = checkpoint_dir(output_dir)
    path = os.path.join(folder, f"step-{step:09d}.pt")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_bytes(os.path.join(folder, LATEST), os.path.basename(path).encode() + b"\n")
    for old in sorted(glob.glob(os.path.join(folder, "step-*.pt")))[:-keep]:
        if os.path.basename(old) != os.path.basename(path):
            os.remove(old)
    return path


def latest_checkpoint(output_dir: str) -> str | None:
    """The path ``latest`` names, or the highest-step file, or None when the run has no checkpoint yet."""
    folder = checkpoint_dir(output_dir)
    pointer = os.path.join(folder, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(folder, f.read().strip())
        if os.path.isfile(path):
            return path
    found = sorted(p for p in glob.glob(os.path.join(folder, "step-*.pt")) if _NAME.search(p))
    return found[-1] if found else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    if os.path.isdir(path):
        found = latest_checkpoint(path) or latest_checkpoint(os.path.dirname(path.rstrip("/")))
        if found is None:
            raise CheckpointError(f"{path}: no checkpoints found")
        return found
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    return path


def load_checkpoint(path: str) -> dict:
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def model_from_checkpoint(path: str, use_ema: bool = True):
    """The model a checkpoint holds (AutoencoderKL, or the class its config names; EMA weights when it has them
    and ``use_ema``), in eval mode."""
    from klvae.config import config_from_dict
    from klvae.torch.auto import model_class

    state = load_checkpoint(path)
    config = config_from_dict(state["model_config"])
    model = model_class(config.class_name)(config=config)
    model.load_state_dict(state["model"], strict=True)
    if use_ema and state.get("ema") is not None:
        ema = state["ema"]["shadow"]
        model.load_state_dict({**state["model"], **ema}, strict=True)
    return model.eval()
