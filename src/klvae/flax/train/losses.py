"""The objective of latent diffusion's KL autoencoder in JAX: pure functions mirroring
:mod:`klvae.torch.train.losses` (same reductions: sums per image, averaged over the batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klvae.flax.outputs import FlaxDiagonalGaussianDistribution
from klvae.train.objective import LossWeights as LossWeights
from klvae.train.objective import adopt_weight as adopt_weight


def reconstruction_loss(x: jax.Array, x_rec: jax.Array, l1_weight: float = 1.0, l2_weight: float = 0.0,
                        chroma_weight: float = 0.0) -> jax.Array:
    """Per-pixel loss of :func:`klvae.torch.train.losses.reconstruction_loss`, on NCHW images (the public layout
    of the Flax model)."""
    diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
    loss = jnp.zeros_like(diff)
    if l1_weight:
        loss = loss + l1_weight * jnp.abs(diff)
    if l2_weight:
        loss = loss + l2_weight * jnp.square(diff)
    if chroma_weight:
        loss = loss + chroma_weight * jnp.square(diff - diff.mean(axis=1, keepdims=True))
    return loss


def nll_loss(rec: jax.Array, logvar: jax.Array) -> jax.Array:
    """``sum(rec / exp(logvar) + logvar) / B`` with a scalar output log-variance."""
    return jnp.sum(rec / jnp.exp(logvar) + logvar) / rec.shape[0]


def kl_loss(posterior: FlaxDiagonalGaussianDistribution) -> jax.Array:
    kl = posterior.kl()
    return jnp.sum(kl) / kl.shape[0]


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
    if kind == "vanilla":
        return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))
    raise ValueError(f"unknown adversarial loss {kind!r}; choose hinge or vanilla")


def generator_adv_loss(logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "vanilla":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    raise ValueError(f"unknown adversarial loss {kind!r}; choose hinge or vanilla")


def adaptive_weight_from_grads(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """``disc_weight * ||nll_grad|| / (||g_grad|| + 1e-4)``, clamped to [0, 1e4], no gradient: the gradients
    are those of the NLL and the GAN term at the decoder's last conv kernel."""
    w = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)
