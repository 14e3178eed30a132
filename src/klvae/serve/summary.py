"""What a person needs to know about the served model, in words: its name, architecture and latent convention.

``GET /info`` carries it as ``summary``; the page at ``GET /`` shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def model_summary(name: str, model: Any) -> dict[str, Any]:
    cfg = model.config
    blocks = ", ".join(str(c) for c in cfg["block_out_channels"])
    params = model.num_parameters()
    return {
        "name": name,
        "class": type(model).__name__,
        "architecture": (f"{type(model).__name__}, KL-f{cfg.downsample_factor}, {cfg['in_channels']} -> "
                         f"{cfg['latent_channels']} latent channels, blocks ({blocks}), {cfg['layers_per_block']} "
                         f"resnet{'s' if cfg['layers_per_block'] > 1 else ''} per block, {_count(params)} parameters"),
        "latent_convention": latent_convention(cfg),
        "downsample_factor": cfg.downsample_factor,
        "latent_channels": cfg["latent_channels"],
        "in_channels": cfg["in_channels"],
    }


def latent_convention(cfg: Mapping[str, Any]) -> str:
    """How a diffusion model sees this VAE's latents (what ``klvae.scale_latents`` applies)."""
    s = cfg["scaling_factor"]
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        return f"(z - latents_mean) * {s:g} / latents_std, per channel ({len(mean)} channels)"
    shift = cfg.get("shift_factor")
    if shift is not None:
        return f"(z - {shift:g}) * {s:g}"
    return f"z * {s:g}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
