"""Return types of the Flax model: the posterior and the output records, as pytrees (they cross ``jax.jit``).

Everything here is NCHW, like the PyTorch backend. diffusers' and maxdiffusion's Flax posterior is NHWC (it splits
the moments on the last axis); ours splits on axis 1, so ``latent_dist.mode()`` is ``(B, C, h, w)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from klvae.config import LOGVAR_CLAMP


class _Output:
    """Also indexes like a tuple (``out[0]``) or a dict (``out["sample"]``), as the torch records do."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@struct.dataclass
class FlaxDiagonalGaussianDistribution:
    """A diagonal Gaussian over latents, from ``parameters = concat([mean, logvar], axis=1)`` (NCHW).

    ``logvar`` is clamped to [-30, 20]. With ``deterministic=True`` the variance is zero: ``sample(key)`` returns
    the mean and ``kl``/``nll`` are zero. A pytree: ``parameters`` is its only leaf.
    """

    parameters: jax.Array
    deterministic: bool = struct.field(pytree_node=False, default=False)

    @property
    def mean(self) -> jax.Array:
        return jnp.split(self.parameters, 2, axis=1)[0]

    @property
    def logvar(self) -> jax.Array:
        return jnp.clip(jnp.split(self.parameters, 2, axis=1)[1], *LOGVAR_CLAMP)

    @property
    def std(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``key``."""
        mean = self.mean
        return mean + self.std * jax.random.normal(key, mean.shape, mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: FlaxDiagonalGaussianDistribution | None = None) -> jax.Array:
        """KL(self || other) summed over (C, H, W): one value per batch item. ``other=None`` means N(0, I)."""
        if self.deterministic:
            return jnp.zeros((1,), self.parameters.dtype)
        mean, var, logvar = self.mean, self.var, self.logvar
        if other is None:
            return 0.5 * jnp.sum(mean**2 + var - 1.0 - logvar, axis=(1, 2, 3))
        return 0.5 * jnp.sum((mean - other.mean) ** 2 / other.var + var / other.var - 1.0 - logvar + other.logvar,
                             axis=(1, 2, 3))

    def nll(self, sample: jax.Array, axis: tuple[int, ...] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``axis``."""
        if self.deterministic:
            return jnp.zeros((1,), self.parameters.dtype)
        logvar = self.logvar
        return 0.5 * jnp.sum(math.log(2.0 * math.pi) + logvar + (sample - self.mean) ** 2 / self.var, axis=axis)


@struct.dataclass
class FlaxDecoderOutput(_Output):
    """``sample``: decoded images, (B, C, H, W), nominally in [-1, 1] (not clamped)."""

    sample: jax.Array


@struct.dataclass
class FlaxAutoencoderKLOutput(_Output):
    """``latent_dist``: the posterior over latents (NCHW)."""

    latent_dist: FlaxDiagonalGaussianDistribution
