"""FLUX.2's VAE (diffusers' ``AutoencoderKLFlux2``): our AutoencoderKL plus the BatchNorm holding its latent statistics.

The encoder and decoder are AutoencoderKL's (the decoder may be wider or narrower than the encoder:
``decoder_block_out_channels``). ``bn`` is a ``BatchNorm2d`` without affine parameters over the latents
patchified 2x2 (32 -> 128 channels); ``encode``/``decode`` never run it. Its running statistics are the latent
normalisation FLUX.2's transformer sees, applied by :func:`klvae.latents.scale_latents` (``scale_latents(z, vae)``),
as diffusers' FLUX.2 pipeline applies them from ``vae.bn.running_mean``/``running_var``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from klvae.config import AutoencoderKLFlux2Config
from klvae.latents import patchify
from klvae.torch.model import AutoencoderKL


class AutoencoderKLFlux2(AutoencoderKL):
    """FLUX.2's autoencoder with diffusers' ``AutoencoderKLFlux2`` constructor, config, state_dict and methods.

    ``AutoencoderKLFlux2()`` is the published architecture with random weights; load real ones with
    :meth:`from_pretrained` (a diffusers folder such as ``black-forest-labs/FLUX.2-dev``, subfolder ``vae``) or
    :meth:`from_single_file` (BFL's ``ae.safetensors``). Everything AutoencoderKL offers (tiling, slicing,
    attention processors, gradient checkpointing, compile) works the same.
    """

    config_class = AutoencoderKLFlux2Config

    def __init__(self, config: AutoencoderKLFlux2Config | None = None, **config_fields: Any):
        super().__init__(config, **config_fields)
        cfg = self.config
        self.bn = nn.BatchNorm2d(cfg.batch_norm_channels, eps=cfg.batch_norm_eps, momentum=cfg.batch_norm_momentum,
                                 affine=False, track_running_stats=True)

    @torch.no_grad()
    def update_latent_statistics(self, latents: torch.Tensor) -> None:
        """Fold a batch of (B, latent_channels, h, w) latents into the BatchNorm's running statistics (what
        training FLUX.2's VAE does; fine-tuning leaves them alone unless asked). Uses the configured momentum."""
        was_training = self.bn.training
        self.bn.train()
        try:
            self.bn(patchify(latents.to(self.bn.running_mean.dtype), self.config.latent_patch_size))
        finally:
            self.bn.train(was_training)
