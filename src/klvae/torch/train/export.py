"""Export a training checkpoint as a diffusers-layout folder (``config.json`` + safetensors)."""

from __future__ import annotations

import torch

from klvae.torch.state_dict import as_torch_dtype
from klvae.torch.train.checkpoint import model_from_checkpoint, resolve_checkpoint


def export_checkpoint(checkpoint: str, out_dir: str, *, use_ema: bool = True,
                      dtype: torch.dtype | str | None = None) -> str:
    """Write the checkpoint's model (EMA weights when present and ``use_ema``) with ``save_pretrained``;
    ``checkpoint`` is a file or a run folder. Returns the checkpoint file used."""
    path = resolve_checkpoint(checkpoint)
    model = model_from_checkpoint(path, use_ema=use_ema)
    if dtype is not None:
        model = model.to(as_torch_dtype(dtype))
    model.save_pretrained(out_dir)
    return path
