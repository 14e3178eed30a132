"""Layer factories shared by the Flax blocks: convolutions, projections, norms and activations (NHWC).

Every block carries the same three numerics fields (``dtype`` for compute, ``param_dtype`` for storage,
``precision`` for convs and matmuls) and builds its layers through these helpers, so the choices below hold
everywhere: GroupNorm statistics in float32 with the two-pass variance (``use_fast_variance=False``), epsilon 1e-6.
A norm's output stays float32 through the activation that follows it; the next conv or projection casts to
``dtype``. Under jit the norm, activation and cast fuse into one pass, and in bfloat16 this rounds once instead
of three times (norm, sigmoid, product), which brings the bf16 error to the PyTorch bf16 model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from klvae.config import NORM_EPS

Dtype = Any
Precision = Any  # None, a jax.lax.Precision, or its name ("highest")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
    "mish": jax.nn.mish,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return _ACTIVATIONS[name]


def conv(block: nn.Module, features: int, kernel: int, *, stride: int = 1, padding: Any = None) -> nn.Conv:
    """A square conv with the block's numerics; padding defaults to "same" for odd kernels, written explicitly."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=block.dtype,
                   param_dtype=block.param_dtype, precision=block.precision)


def dense(block: nn.Module, features: int) -> nn.Dense:
    return nn.Dense(features, dtype=block.dtype, param_dtype=block.param_dtype, precision=block.precision)


def group_norm(block: nn.Module, groups: int) -> nn.GroupNorm:
    """GroupNorm over NHWC with float32 statistics and a float32 output (see the module docstring)."""
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, use_fast_variance=False, force_float32_reductions=True,
                        dtype=jnp.promote_types(block.dtype, jnp.float32), param_dtype=block.param_dtype)


def to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))
