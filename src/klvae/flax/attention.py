"""The mid-block self-attention (single head over all spatial positions), NHWC.

Parameter names follow diffusers' Flax VAE (``group_norm``, ``query``, ``key``, ``value``, ``proj_attn``); the
canonical ``to_q``/``to_k``/``to_v``/``to_out.0`` map onto them (klvae.weights.flax). Scores are accumulated
and soft-maxed in float32 whatever the compute dtype, as the PyTorch model's upcast softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from klvae.flax.layers import Dtype, Precision, dense, group_norm


class FlaxAttentionBlock(nn.Module):
    channels: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self) -> None:
        self.group_norm = group_norm(self, self.num_groups)
        self.query = dense(self, self.channels)
        self.key = dense(self, self.channels)
        self.value = dense(self, self.channels)
        self.proj_attn = dense(self, self.channels)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        residual = hidden_states
        b, h, w, c = hidden_states.shape
        x = self.group_norm(hidden_states).reshape(b, h * w, c)
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * (1.0 / math.sqrt(c)), axis=-1).astype(v.dtype)
        x = jnp.einsum("bqk,bkc->bqc", probs, v, precision=self.precision)
        x = self.proj_attn(x).reshape(b, h, w, c)
        return x + residual
