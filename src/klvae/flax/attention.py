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
    """``x + proj_attn(attention(group_norm(x)))`` over all H * W positions, one head.

    ``query_chunk_size``: attend that many queries at a time in a ``lax.map`` (memory O(chunk * H * W) instead of
    O((H * W)^2) for the scores); None attends all at once.
    """

    channels: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    query_chunk_size: int | None = None

    def setup(self) -> None:
        self.group_norm = group_norm(self, self.num_groups)
        self.query = dense(self, self.channels)
        self.key = dense(self, self.channels)
        self.value = dense(self, self.channels)
        self.proj_attn = dense(self, self.channels)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        x = self.group_norm(hidden_states)
        return self._attend(x, x, hidden_states)

    def band(self, hidden_states: jax.Array, start: jax.Array | int, rows: int) -> jax.Array:
        """Rows ``start:start + rows`` of the output: queries from those rows only, keys and values (and the
        GroupNorm statistics) from all of ``hidden_states``. A band reaching past the last row is cut short by
        ``lax.dynamic_slice`` (moved up); a band starting at or past it reads rows of zeros."""
        x = self.group_norm(hidden_states)

        def take(a: jax.Array) -> jax.Array:
            a = jnp.pad(a, ((0, 0), (0, rows), (0, 0), (0, 0)))
            return jax.lax.dynamic_slice_in_dim(a, start, rows, axis=1)

        return self._attend(take(x), x, take(hidden_states))

    def _attend(self, queries: jax.Array, context: jax.Array, residual: jax.Array) -> jax.Array:
        """``residual + proj_attn(attention(queries over context))``, all normalised NHWC."""
        b, h, w, c = queries.shape
        everything = context.reshape(b, -1, c)
        q, k, v = self.query(queries.reshape(b, h * w, c)), self.key(everything), self.value(everything)
        x = attend(q, k, v, 1.0 / math.sqrt(c), self.precision, self.query_chunk_size)
        return self.proj_attn(x).reshape(b, h, w, c) + residual


def attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, precision: Precision = None,
           query_chunk_size: int | None = None) -> jax.Array:
    """``softmax(q k^T * scale) v`` for (B, N, C) inputs; scores and softmax in float32."""
    def block(queries: jax.Array) -> jax.Array:
        scores = jnp.einsum("bqc,bkc->bqk", queries, k, precision=precision, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * scale, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", probs, v, precision=precision)

    n = q.shape[1]
    if query_chunk_size is None or n <= query_chunk_size:
        return block(q)
    chunks = -(-n // query_chunk_size)
    padded = jnp.pad(q, ((0, 0), (0, chunks * query_chunk_size - n), (0, 0)))  # padded queries are dropped
    blocks = padded.reshape(q.shape[0], chunks, query_chunk_size, q.shape[2]).swapaxes(0, 1)
    out = jax.lax.map(block, blocks).swapaxes(0, 1).reshape(q.shape[0], chunks * query_chunk_size, v.shape[2])
    return out[:, :n]
