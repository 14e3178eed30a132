"""The PatchGAN discriminator in Flax (NCHW in and out, NHWC inside), mirroring the PyTorch one layer for layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


class FlaxNLayerDiscriminator(nn.Module):
    in_channels: int = 3
    channels: int = 64
    n_layers: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        init = nn.initializers.normal(0.02)
        pad = ((1, 1), (1, 1))
        h = jnp.transpose(x, (0, 2, 3, 1))
        h = nn.Conv(self.channels, (4, 4), (2, 2), padding=pad, kernel_init=init, name="conv0")(h)
        h = nn.leaky_relu(h, 0.2)
        mult = 1
        for n in range(1, self.n_layers + 1):
            mult = min(2 ** n, 8)
            stride = 2 if n < self.n_layers else 1
            h = nn.Conv(self.channels * mult, (4, 4), (stride, stride), padding=pad, use_bias=False,
                        kernel_init=init, name=f"conv{n}")(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d),
                             name=f"norm{n}")(h)
            h = nn.leaky_relu(h, 0.2)
        h = nn.Conv(1, (4, 4), padding=pad, kernel_init=init, name=f"conv{self.n_layers + 1}")(h)
        return jnp.transpose(h, (0, 3, 1, 2))


def discriminator_variables_from_torch(state_dict: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Flax ``{"params", "batch_stats"}`` for a :class:`klvae.torch.train.NLayerDiscriminator` state dict."""
    def arr(k: str) -> np.ndarray:
        v = state_dict[k]
        return np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)

    params: dict[str, Any] = {"conv0": {"kernel": arr("main.0.weight").transpose(2, 3, 1, 0),
                                        "bias": arr("main.0.bias")}}
    stats: dict[str, Any] = {}
    for n in range(1, n_layers + 1):
        ci, bi = 2 + 3 * (n - 1), 3 + 3 * (n - 1)
        params[f"conv{n}"] = {"kernel": arr(f"main.{ci}.weight").transpose(2, 3, 1, 0)}
        params[f"norm{n}"] = {"scale": arr(f"main.{bi}.weight"), "bias": arr(f"main.{bi}.bias")}
        stats[f"norm{n}"] = {"mean": arr(f"main.{bi}.running_mean"), "var": arr(f"main.{bi}.running_var")}
    last = 2 + 3 * n_layers
    params[f"conv{n_layers + 1}"] = {"kernel": arr(f"main.{last}.weight").transpose(2, 3, 1, 0),
                                     "bias": arr(f"main.{last}.bias")}
    return {"params": params, "batch_stats": stats}
