"""FLUX.2's VAE in Flax: ``FlaxAutoencoderKLFlux2``, the Flax AutoencoderKL plus FLUX.2's latent statistics.

Mirrors :class:`klvae.torch.flux2.AutoencoderKLFlux2`. The BatchNorm's statistics sit in the parameter tree as
``params["bn"] = {"running_mean", "running_var", "num_batches_tracked"}`` (the torch buffers' names), so one
``(model, params)`` pair carries everything; ``encode``/``decode`` never read them, and
``klvae.scale_latents(z, model, params)`` applies them. They are statistics, not weights to train: take them out
before differentiating (:func:`split_latent_statistics`; ``num_batches_tracked`` is an integer).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from klvae.config import AutoencoderKLFlux2Config
from klvae.flax.layers import Dtype
from klvae.flax.model import FlaxAutoencoderKL


class FlaxLatentStatistics(nn.Module):
    """The running mean and variance of FLUX.2's patchified latents (a BatchNorm without affine parameters)."""

    features: int
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.running_mean = self.param("running_mean", nn.initializers.zeros, (self.features,), self.param_dtype)
        self.running_var = self.param("running_var", nn.initializers.ones, (self.features,), self.param_dtype)
        self.num_batches_tracked = self.param("num_batches_tracked", lambda _: jnp.zeros((), jnp.int32))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return self.running_mean, self.running_var


class FlaxAutoencoderKLFlux2(FlaxAutoencoderKL):
    """FLUX.2's autoencoder as a Flax linen module; fields and defaults as :class:`AutoencoderKLFlux2Config`.

    ``FlaxAutoencoderKLFlux2.from_pretrained(folder)`` and ``.from_single_file("ae.safetensors")`` return
    ``(model, params)`` as for :class:`FlaxAutoencoderKL`; everything else (tiling, slicing, jit) is the same.
    """

    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 32
    sample_size: int | tuple[int, ...] = 1024
    scaling_factor: float | None = None
    force_upcast: bool | None = None
    decoder_block_out_channels: tuple[int, ...] | None = None
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, ...] = (2, 2)

    config_class = AutoencoderKLFlux2Config

    def setup(self) -> None:
        super().setup()
        self.bn = FlaxLatentStatistics(self.config.batch_norm_channels, param_dtype=self.param_dtype)

    def __call__(self, sample: jax.Array, sample_posterior: bool = False, deterministic: bool = True,
                 return_dict: bool = True) -> Any:
        if self.is_initializing():  # create the statistics with the weights (encode/decode never use them)
            self.bn()
        return super().__call__(sample, sample_posterior, deterministic, return_dict)


def split_latent_statistics(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(weights, {"bn": statistics})``: FLUX.2's params with the statistics taken out, for ``jax.grad``
    (merge back with ``{**weights, **statistics}``)."""
    weights = {k: v for k, v in params.items() if k != "bn"}
    return weights, {"bn": params["bn"]} if "bn" in params else {}
