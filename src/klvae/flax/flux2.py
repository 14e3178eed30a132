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
from klvae.flax.model import FlaxAutoencoderKL, config_fields_module


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


class FlaxAutoencoderKLFlux2(config_fields_module(AutoencoderKLFlux2Config, FlaxAutoencoderKL)):
    """FLUX.2's autoencoder as a Flax linen module; fields and defaults as :class:`AutoencoderKLFlux2Config`.

    ``FlaxAutoencoderKLFlux2.from_pretrained(folder)`` and ``.from_single_file("ae.safetensors")`` return
    ``(model, params)`` as for :class:`FlaxAutoencoderKL`; everything else (tiling, slicing, jit) is the same.
    """

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
