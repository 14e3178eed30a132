"""Run an :class:`~klvae.tiling_plan.ExactPlan` with JAX: the array operations of the shared executor.

The plan (shared with the PyTorch backend) says which nodes each pass computes over which rectangles, and the
executor skeleton (:mod:`klvae.tiling_executor`) walks it. This module supplies the arrays. Eagerly it runs one
jitted operation per node and tile, so that memory follows the plan: stored nodes are kept as per-tile chunks
and dropped after the last tile that reads them, and everything else is freed as soon as Python drops it;
GroupNorm statistics are accumulated per tile in float64 on the host (Chan's parallel formula), so the
normalisation is that of the whole tensor. Under ``jax.jit`` the same walk traces into one program
(:class:`TracedExecutor`): the moments stay float32 device arrays, and the tiles are put in sequence by
optimization barriers so that XLA does not interleave them.

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
from klvae.tiling_executor import ChunkStore, ExactExecutor, GroupMoments, Pads, Pieces, WholeStore, zero_pads
from klvae.tiling_graph import INPUT, Node, Region, clip
from klvae.tiling_plan import ExactPlan
from klvae.weights.flax import flax_module_path

# Above this many bytes of (N, N) attention scores the global attention step attends in query chunks.
_MAX_ATTENTION_SCORES_BYTES = 1 << 30


class GroupNormStats(GroupMoments):
    """Per-(batch, group) count, mean and sum of squared deviations, combined over tiles: in float64 on the host
    (``host=True``, eager runs) or in float32 as device arrays (``host=False``: traced runs, where nothing can
    leave the device; Chan's merge keeps float32 well within the 1e-4 bound)."""

    def __init__(self, groups: int, host: bool = True):
        super().__init__(groups)
        self.host = host

    def part_count(self, x: jax.Array) -> int:
        b, h, w, c = x.shape
        return h * w * (c // self.groups)

    def part_moments(self, x: jax.Array) -> tuple[Any, Any]:
        mean, m2 = _tile_moments(x, self.groups)
        if self.host:
            return np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        return mean, m2

    def scale_shift(self, scale: Any, bias: Any) -> tuple[jax.Array, jax.Array]:
        """(scale, shift), each (B, 1, 1, C) float32, such that ``norm(x) == x * scale + shift``."""
        xp, dtype = (np, np.float64) if self.host else (jnp, jnp.float32)
        rstd = 1.0 / xp.sqrt(self.m2 / self.count + NORM_EPS)                 # (B, G)
        per_group = scale.shape[0] // self.groups
        rstd, mean = xp.repeat(rstd, per_group, axis=1), xp.repeat(self.mean, per_group, axis=1)
        mul = rstd * xp.asarray(scale, dtype)
        add = xp.asarray(bias, dtype) - mean * mul
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


def norm_act(x: jax.Array, mul: jax.Array, add: jax.Array, act: str) -> jax.Array:
    """act(x * mul + add): a GroupNorm given its (scale, shift), then the activation, in float32 as the model's
    layers compute them."""
    return activation(act)(x.astype(jnp.float32) * mul + add)


@functools.partial(jax.jit, static_argnames=("act", "pads", "dtype", "precision"))
def _norm_act_conv(x, mul, add, kernel, bias, *, act: str, pads: Pads, dtype, precision):
    """conv(act(x * mul + add))."""
    return _conv(norm_act(x, mul, add, act), kernel, bias, pads=pads, stride=1, dtype=dtype, precision=precision)


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

    def __init__(self, module: Any, params: Any, traced: bool = False):
        self.module, self.params, self.traced = module, params, traced
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
        return GroupNormStats(groups, host=not self.traced)

    def scale_shift(self, node: Node, moments: GroupNormStats) -> tuple[jax.Array, jax.Array]:
        norm = self.tree(node.norm)
        return moments.scale_shift(norm["scale"], norm["bias"])

    def run_global(self, node: Node, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        return _apply_attention(self.attention_block(c, b, h * w, h * w), self.tree(node.module), x)

    def attention_block(self, channels: int, batch: int, queries: int, keys: int,
                        max_scores_bytes: int = _MAX_ATTENTION_SCORES_BYTES) -> FlaxAttentionBlock:
        """The attention as a detached module, attending in query chunks where the (queries x keys) float32
        scores would exceed ``max_scores_bytes``."""
        chunk = None
        if batch * queries * keys * 4 > max_scores_bytes:
            chunk = max(1, max_scores_bytes // (batch * keys * 4))
        return FlaxAttentionBlock(channels, self.config.norm_num_groups, dtype=self.module.dtype,
                                  param_dtype=self.module.param_dtype, precision=self.module.precision,
                                  query_chunk_size=chunk, parent=None)


@functools.partial(jax.jit, static_argnums=0)
def _apply_attention(block: FlaxAttentionBlock, params: Any, x: jax.Array) -> jax.Array:
    return block.apply({"params": params}, x)


class TracedExecutor(ExactExecutor):
    """The executor under ``jax.jit``: the same walk, traced into one program.

    XLA schedules that program as a whole and may interleave the tiles, keeping several tiles' working sets
    alive at once. With ``sequence`` (the default) every tile starts with an ``optimization_barrier`` over all
    that is held so far (stored chunks, whole nodes, GroupNorm moments and scales), so nothing of tile t can be
    computed before tile t - 1's results exist and only one tile's working set is alive at a time, as eagerly.
    """

    def __init__(self, plan: ExactPlan, ops: FlaxTileOps, sequence: bool = True):
        super().__init__(plan, ops)
        self.sequence = sequence

    def run_tile(self, *args: Any) -> None:
        if self.sequence:
            self.barrier()
        super().run_tile(*args)

    def barrier(self) -> None:
        """Pass every array the executor holds through one ``optimization_barrier`` and keep its outputs."""
        state = ({name: store.array for name, store in self.stores.items() if isinstance(store, WholeStore)},
                 {name: {key: chunk[0] for key, chunk in store.chunks.items()}
                  for name, store in self.stores.items() if isinstance(store, ChunkStore)},
                 {name: (m.mean, m.m2) for name, m in self.stats.items() if m.mean is not None},
                 self.norms)
        whole, chunked, moments, self.norms = jax.lax.optimization_barrier(state)
        for name, array in whole.items():
            self.stores[name].array = array
        for name, chunks in chunked.items():
            store = self.stores[name]
            store.chunks = {key: (array, *store.chunks[key][1:]) for key, array in chunks.items()}
        for name, (mean, m2) in moments.items():
            self.stats[name].mean, self.stats[name].m2 = mean, m2


def is_traced(x: Any, params: Any) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in (x, *jax.tree_util.tree_leaves(params)))


def run_exact(module: Any, params: Any, plan: ExactPlan, x: jax.Array, sequence: bool = True) -> jax.Array:
    """Decode latents or encode images (per ``plan.graph.kind``), NHWC in and out, following ``plan``.

    ``module`` is the FlaxAutoencoderKL (for its config and numerics), ``params`` its parameter tree. Eagerly, one
    compiled operation per node and tile; traced (under ``jax.jit``), one program whose tiles run in sequence
    (``sequence``; see :class:`TracedExecutor`).
    """
    if plan.graph[plan.graph.input].op != INPUT:
        raise ValueError("the plan's graph has no input node")
    if is_traced(x, params):
        return TracedExecutor(plan, FlaxTileOps(module, params, traced=True), sequence).run(x)
    return ExactExecutor(plan, FlaxTileOps(module, params)).run(x)
