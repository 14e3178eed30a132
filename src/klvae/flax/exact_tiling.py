"""Run an :class:`~klvae.tiling_plan.ExactPlan` with JAX: the array operations of the shared executor.

The plan (shared with the PyTorch backend) says which nodes each pass computes over which rectangles, and the
executor skeleton (:mod:`klvae.tiling_executor`) walks it. This module supplies the arrays. It runs eagerly, one
jitted operation per node and tile, so that memory follows the plan: stored nodes are kept as per-tile chunks
and dropped after the last tile that reads them, and everything else is freed as soon as Python drops it. Under
``jax.jit`` none of that would hold (XLA schedules the whole graph at once), so a traced input is refused.
GroupNorm statistics are accumulated per tile in float64 on the host (Chan's parallel formula), so the
normalisation is that of the whole tensor.

Arrays are NHWC; regions are ``(r0, r1, c0, c1)`` in a node's own pixels (see :mod:`klvae.tiling_graph`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klvae.config import NORM_EPS
from klvae.flax.attention import FlaxAttentionBlock
from klvae.flax.layers import activation
from klvae.tiling_executor import ExactExecutor, GroupMoments, Pads, Pieces, zero_pads
from klvae.tiling_graph import INPUT, Node, Region, clip
from klvae.tiling_plan import ExactPlan
from klvae.weights.flax import flax_module_path

# Above this many bytes of (N, N) attention scores the global attention step attends in query chunks.
_MAX_ATTENTION_SCORES_BYTES = 1 << 30


class GroupNormStats(GroupMoments):
    """Per-(batch, group) count, mean and sum of squared deviations, combined over tiles in float64."""

    def part_count(self, x: jax.Array) -> int:
        b, h, w, c = x.shape
        return h * w * (c // self.groups)

    def part_moments(self, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        mean, m2 = (np.asarray(a, np.float64) for a in _tile_moments(x, self.groups))
        return mean, m2

    def scale_shift(self, scale: np.ndarray, bias: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(scale, shift), each (B, 1, 1, C) float32, such that ``norm(x) == x * scale + shift``."""
        rstd = 1.0 / np.sqrt(self.m2 / self.count + NORM_EPS)                 # (B, G)
        per_group = scale.shape[0] // self.groups
        rstd, mean = np.repeat(rstd, per_group, axis=1), np.repeat(self.mean, per_group, axis=1)
        weight, shift = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
        mul = rstd * weight
        add = shift - mean * mul
        return (jnp.asarray(mul[:, None, None, :], jnp.float32), jnp.asarray(add[:, None, None, :], jnp.float32))


@functools.partial(jax.jit, static_argnums=1)
def _tile_moments(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """(mean, sum of squared deviations) per (batch, group) of one tile, two-pass in float32."""
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3))
    return mean, jnp.square(g - mean[:, None, :, None]).sum(axis=(1, 3))


# ---------------------------------------------------------------------------------------------- operations
@functools.partial(jax.jit, static_argnames=("pads", "stride", "dtype", "precision"))
def _conv(x, kernel, bias, *, pads: Pads, stride: int, dtype, precision):
    """A VALID conv on ``x`` zero-padded by ``pads``, in ``dtype`` as ``flax.linen.Conv`` computes it."""
    x = jnp.pad(x.astype(dtype), ((0, 0), pads[:2], pads[2:], (0, 0)))
    y = jax.lax.conv_general_dilated(x, kernel.astype(dtype), (stride, stride), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y + bias.astype(dtype)


@functools.partial(jax.jit, static_argnames=("act", "pads", "dtype", "precision"))
def _norm_act_conv(x, mul, add, kernel, bias, *, act: str, pads: Pads, dtype, precision):
    """conv(act(x * mul + add)): the norm and activation in float32, as the model's layers do."""
    y = activation(act)(x.astype(jnp.float32) * mul + add)
    return _conv(y, kernel, bias, pads=pads, stride=1, dtype=dtype, precision=precision)


@functools.partial(jax.jit, static_argnames=("start", "pads", "dtype", "precision"))
def _up_conv(x, kernel, bias, *, start: tuple[int, int, int, int], pads: Pads, dtype, precision):
    """conv(nearest_2x(x)) over part of the upsampled map: ``start`` crops the upsampled rows and columns."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    up = up[:, start[0]:up.shape[1] - start[1], start[2]:up.shape[2] - start[3], :]
    return _conv(up, kernel, bias, pads=pads, stride=1, dtype=dtype, precision=precision)


class FlaxTileOps:
    """The JAX operations of :class:`~klvae.tiling_executor.ExactExecutor`, on ``module``'s parameters."""

    row_axis = 1  # NHWC
    in_place = False  # arrays are immutable: whole nodes are stored as chunks and joined when read whole

    def __init__(self, module: Any, params: Any):
        self.module, self.params = module, params
        self.config = module.config
        self.numerics = dict(dtype=jnp.dtype(module.dtype), precision=module.precision)

    def tree(self, module_path: str) -> Any:
        node = self.params
        for name in flax_module_path(module_path):
            node = node[name]
        return node

    def activation_name(self, path: str) -> str:
        return self.config.act_fn if path.endswith(".nonlinearity") else "silu"  # conv_act is always SiLU

    # ------------------------------------------------------------------ arrays
    def join(self, parts: list[jax.Array], axis: int) -> jax.Array:
        return jnp.concatenate(parts, axis=axis)

    def own(self, x: jax.Array) -> jax.Array:
        return x  # a slice of a JAX array is an array of its own

    def begin_pass(self) -> None:
        pass

    # ------------------------------------------------------------------ operations over a rectangle
    def conv(self, node: Node, x: jax.Array, wanted: Region, got: Region, stride: int) -> jax.Array:
        conv = self.tree(node.conv)
        return _conv(x, conv["kernel"], conv["bias"], pads=zero_pads(wanted, got), stride=stride, **self.numerics)

    def up_conv(self, node: Node, x: jax.Array, got: Region, region: Region, in_size: tuple[int, int]) -> jax.Array:
        """``x`` holds input rows and columns ``got``; the upsampled map is cropped to the rows ``region`` reads."""
        conv = self.tree(node.conv)
        r0, r1, c0, c1 = region
        wanted = (r0 - 1, r1 + 1, c0 - 1, c1 + 1)
        up = clip(wanted, (2 * in_size[0], 2 * in_size[1]))
        start = (up[0] - 2 * got[0], 2 * got[1] - up[1], up[2] - 2 * got[2], 2 * got[3] - up[3])
        return _up_conv(x, conv["kernel"], conv["bias"], start=start, pads=zero_pads(wanted, up), **self.numerics)

    def norm_act_conv(self, node: Node, x: Pieces, wanted: Region, got: Region,
                      norm: tuple[jax.Array, jax.Array]) -> jax.Array:
        conv = self.tree(node.conv)
        mul, add = norm
        return _norm_act_conv(x.tensor(got), mul, add, conv["kernel"], conv["bias"],
                              act=self.activation_name(node.act), pads=zero_pads(wanted, got), **self.numerics)

    # ------------------------------------------------------------------ statistics and the global step
    def moments(self, groups: int) -> GroupNormStats:
        return GroupNormStats(groups)

    def scale_shift(self, node: Node, moments: GroupNormStats) -> tuple[jax.Array, jax.Array]:
        norm = self.tree(node.norm)
        return moments.scale_shift(np.asarray(norm["scale"]), np.asarray(norm["bias"]))

    def run_global(self, node: Node, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        chunk = None
        if b * (h * w) ** 2 * 4 > _MAX_ATTENTION_SCORES_BYTES:
            chunk = max(1, _MAX_ATTENTION_SCORES_BYTES // (b * h * w * 4))
        block = FlaxAttentionBlock(c, self.config.norm_num_groups, dtype=self.module.dtype,
                                   param_dtype=self.module.param_dtype, precision=self.module.precision,
                                   query_chunk_size=chunk, parent=None)  # a detached module
        return _apply_attention(block, self.tree(node.module), x)


@functools.partial(jax.jit, static_argnums=0)
def _apply_attention(block: FlaxAttentionBlock, params: Any, x: jax.Array) -> jax.Array:
    return block.apply({"params": params}, x)


def run_exact(module: Any, params: Any, plan: ExactPlan, x: jax.Array) -> jax.Array:
    """Decode latents or encode images (per ``plan.graph.kind``), NHWC in and out, following ``plan``.

    ``module`` is the FlaxAutoencoderKL (for its config and numerics), ``params`` its parameter tree.
    """
    if plan.graph[plan.graph.input].op != INPUT:
        raise ValueError("the plan's graph has no input node")
    if isinstance(x, jax.core.Tracer) or any(isinstance(p, jax.core.Tracer) for p in jax.tree_util.tree_leaves(params)):
        raise RuntimeError("exact tiling runs eagerly, freeing activations as it goes, and cannot be traced: call "
                           "model.apply outside jax.jit/grad/vmap, or use untiled or blend tiling there")
    return ExactExecutor(plan, FlaxTileOps(module, params)).run(x)
