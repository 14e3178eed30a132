"""What a person needs to know about the served model, in words: its name, architecture and latent convention.

``GET /info`` carries it as ``summary``; the page at ``GET /`` shows it.
"""

from __future__ import annotations

from typing import Any

from klvae.latents import describe_convention


def model_summary(name: str, model: Any) -> dict[str, Any]:
    cfg = model.config
    blocks = ", ".join(str(c) for c in cfg["block_out_channels"])
    if tuple(cfg.decoder_channels) != tuple(cfg["block_out_channels"]):  # FLUX.2 may widen or narrow its decoder
        blocks += "; decoder " + ", ".join(str(c) for c in cfg.decoder_channels)
    params = model.num_parameters()
    return {
        "name": name,
        "class": type(model).__name__,
        "architecture": (f"{type(model).__name__}, KL-f{cfg.downsample_factor}, {cfg['in_channels']} -> "
                         f"{cfg['latent_channels']} latent channels, blocks ({blocks}), {cfg['layers_per_block']} "
                         f"resnet{'s' if cfg['layers_per_block'] > 1 else ''} per block, {_count(params)} parameters"),
        "latent_convention": describe_convention(cfg),
        "downsample_factor": cfg.downsample_factor,
        "latent_channels": cfg["latent_channels"],
        "in_channels": cfg["in_channels"],
    }


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
