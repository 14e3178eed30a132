"""Run an :class:`~klvae.tiling_plan.ExactPlan` with JAX: the untiled result, computed tile by tile.

The plan (shared with the PyTorch backend) says which nodes each pass computes over which rectangles. This
module supplies the arrays. It runs eagerly, one jitted operation per node and tile, so that memory follows the
plan: stored nodes are kept as per-tile chunks and dropped after the last tile that reads them, and everything
else is freed as soon as Python drops it. Under ``jax.jit`` none of that would hold (XLA schedules the whole
graph at once), so a traced input is refused. GroupNorm statistics are accumulated per tile in float64 on the
host (Chan's parallel formula), so the normalisation is that of the whole tensor.

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
from klvae.tiling import merge_moments
from klvae.tiling_graph import ADD, CONV, DOWN_CONV, INPUT, NORM_ACT_CONV, UP_CONV, Node, Region, clip
from klvae.tiling_plan import ExactPlan, GlobalStep, Pass, run_steps
from klvae.weights.flax import flax_module_path

# Above this many bytes of (N, N) attention scores the global attention step attends in query chunks.
_MAX_ATTENTION_SCORES_BYTES = 1 << 30
Pads = tuple[int, int, int, int]  # top, bottom, left, right


def crop(x: jax.Array, have: Region, want: Region) -> jax.Array:
    """The part ``want`` of ``x``, which holds the rectangle ``have``."""
    if have == want:
        return x
    if not (have[0] <= want[0] and want[1] <= have[1] and have[2] <= want[2] and want[3] <= have[3]):
        raise AssertionError(f"region {want} is not inside {have}")
    return x[:, want[0] - have[0]:want[1] - have[0], want[2] - have[2]:want[3] - have[2], :]


def _pads(wanted: Region, got: Region) -> Pads:
    """Zero padding that extends the clipped rectangle ``got`` to the unclipped ``wanted``."""
    return got[0] - wanted[0], wanted[1] - got[1], got[2] - wanted[2], wanted[3] - got[3]


# ---------------------------------------------------------------------------------------------- storage
class Store:
    """A node kept between passes: one whole array (the input, an attention output) or one chunk per tile,
    each ``(array, region)``, assembled on reading."""

    def __init__(self, whole: jax.Array | None = None):
        self.whole = whole
        self.chunks: dict[tuple[int, int], tuple[jax.Array, Region]] = {}

    def write(self, key: tuple[int, int], region: Region, value: jax.Array) -> None:
        self.chunks[key] = (value, region)

    def read(self, want: Region) -> jax.Array:
        if self.whole is not None:
            return self.whole[:, want[0]:want[1], want[2]:want[3], :]
        rows: dict[int, list[tuple[int, jax.Array]]] = {}
        for value, (r0, r1, c0, c1) in self.chunks.values():
            a = (max(r0, want[0]), min(r1, want[1]), max(c0, want[2]), min(c1, want[3]))
            if a[0] < a[1] and a[2] < a[3]:
                rows.setdefault(a[0], []).append((a[2], crop(value, (r0, r1, c0, c1), a)))
        bands = [jnp.concatenate([t for _, t in sorted(parts, key=lambda p: p[0])], axis=2)
                 for _, parts in sorted(rows.items())]
        return jnp.concatenate(bands, axis=1) if len(bands) > 1 else bands[0]

    def assemble(self, size: tuple[int, int]) -> jax.Array:
        return self.whole if self.whole is not None else self.read((0, size[0], 0, size[1]))

    def touched(self, want: Region) -> list[tuple[int, int]]:
        return [key for key, (_, (r0, r1, c0, c1)) in self.chunks.items()
                if max(r0, want[0]) < min(r1, want[1]) and max(c0, want[2]) < min(c1, want[3])]


class GroupNormStats:
    """Per-(batch, group) count, mean and sum of squared deviations, combined over tiles in float64."""

    def __init__(self, groups: int):
        self.groups, self.count = groups, 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, x: jax.Array) -> None:
        b, h, w, c = x.shape
        n = h * w * (c // self.groups)
        if n == 0:
            return
        mean, m2 = (np.asarray(a, np.float64) for a in _tile_moments(x, self.groups))
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, n, mean, m2)

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


class _Executor:
    def __init__(self, module: Any, params: Any, plan: ExactPlan):
        self.module, self.params, self.plan, self.graph = module, params, plan, plan.graph
        self.config = module.config
        self.numerics = dict(dtype=jnp.dtype(module.dtype), precision=module.precision)
        self.stores: dict[str, Store] = {}
        self.stats: dict[str, GroupNormStats] = {}
        self.norms: dict[str, tuple[jax.Array, jax.Array]] = {}

    def tree(self, module_path: str) -> Any:
        node = self.params
        for name in flax_module_path(module_path):
            node = node[name]
        return node

    def activation_name(self, path: str) -> str:
        return self.config.act_fn if path.endswith(".nonlinearity") else "silu"  # conv_act is always SiLU

    # ------------------------------------------------------------------ one node over one rectangle
    def compute(self, node: Node, region: Region, values: dict[str, tuple[jax.Array, Region]]) -> jax.Array:
        x, have = values[node.inputs[0]]
        size = self.plan.size(node.inputs[0])
        if node.op == ADD:
            y, y_have = values[node.inputs[1]]
            return crop(x, have, region) + crop(y, y_have, region)
        conv = self.tree(node.conv)
        r0, r1, c0, c1 = region
        if node.op == UP_CONV:
            wanted = (r0 - 1, r1 + 1, c0 - 1, c1 + 1)
            got = clip(wanted, (2 * size[0], 2 * size[1]))
            src = (got[0] // 2, (got[1] + 1) // 2, got[2] // 2, (got[3] + 1) // 2)
            start = (got[0] - 2 * src[0], 2 * src[1] - got[1], got[2] - 2 * src[2], 2 * src[3] - got[3])
            return _up_conv(crop(x, have, src), conv["kernel"], conv["bias"], start=start,
                            pads=_pads(wanted, got), **self.numerics)
        if node.op == DOWN_CONV:
            wanted = (2 * r0, 2 * r1 + 1, 2 * c0, 2 * c1 + 1)
            got = clip(wanted, size)
            return _conv(crop(x, have, got), conv["kernel"], conv["bias"], pads=_pads(wanted, got), stride=2,
                         **self.numerics)
        if node.op not in (CONV, NORM_ACT_CONV):
            raise ValueError(f"cannot compute a {node.op} node over a tile")
        p = node.kernel // 2
        wanted = (r0 - p, r1 + p, c0 - p, c1 + p)
        got = clip(wanted, size)
        if node.op == CONV:
            return _conv(crop(x, have, got), conv["kernel"], conv["bias"], pads=_pads(wanted, got), stride=1,
                         **self.numerics)
        mul, add = self.norm(node)
        return _norm_act_conv(crop(x, have, got), mul, add, conv["kernel"], conv["bias"],
                              act=self.activation_name(node.act), pads=_pads(wanted, got), **self.numerics)

    def norm(self, node: Node) -> tuple[jax.Array, jax.Array]:
        if node.name not in self.norms:
            norm = self.tree(node.norm)
            self.norms[node.name] = self.stats[node.inputs[0]].scale_shift(np.asarray(norm["scale"]),
                                                                            np.asarray(norm["bias"]))
        return self.norms[node.name]

    # ------------------------------------------------------------------ steps
    def run(self, x: jax.Array) -> jax.Array:
        plan, graph = self.plan, self.graph
        self.stores[graph.input] = Store(whole=x)
        run_steps(plan, self.stores, self.run_global, self.run_pass)
        return self.stores[graph.output].assemble(plan.size(graph.output))

    def run_global(self, step: GlobalStep) -> None:
        node = self.graph[step.node]
        src = self.graph[node.inputs[0]]
        x = self.stores[src.name].assemble(self.plan.size(src.name))
        b, h, w, c = x.shape
        chunk = None
        if b * (h * w) ** 2 * 4 > _MAX_ATTENTION_SCORES_BYTES:
            chunk = max(1, _MAX_ATTENTION_SCORES_BYTES // (b * h * w * 4))
        block = FlaxAttentionBlock(c, self.config.norm_num_groups, dtype=self.module.dtype,
                                   param_dtype=self.module.param_dtype, precision=self.module.precision,
                                   query_chunk_size=chunk, parent=None)  # a detached module
        self.stores[node.name] = Store(whole=_apply_attention(block, self.tree(node.module), x))

    def run_pass(self, k: int, step: Pass) -> None:
        plan, graph = self.plan, self.graph
        grid = _step_grid(plan, k)
        tiles = grid.tiles()
        regions = [_regions(plan, step, grid, i, j) for i, j in tiles]
        for name in step.store:
            self.stores[name] = Store()
        for name in step.stats:
            self.stats[name] = GroupNormStats(_groups_reading(graph, name))
        releases = self.releases(k, step, regions)
        for t, (i, j) in enumerate(tiles):
            need = regions[t]
            values: dict[str, tuple[jax.Array, Region]] = {}
            for name in step.closure:
                region = need[name]
                if name in plan.stored and name not in step.store:
                    value = self.stores[name].read(region)
                else:
                    value = self.compute(graph[name], region, values)
                values[name] = (value, region)
                if name in step.store or name in step.stats:
                    owned = grid.owned(i, j, graph[name].scale)
                    part = crop(value, region, owned)
                    if name in step.store:
                        self.stores[name].write((i, j), owned, part)
                    if name in step.stats:
                        self.stats[name].update(part)
            del values
            for name, key in releases.get(t, ()):
                self.stores[name].chunks.pop(key, None)

    def releases(self, k: int, step: Pass, regions: list[dict[str, Region]]) -> dict[int, list]:
        """Chunks of nodes read for the last time in this pass: ``{tile index: [(name, chunk key), ...]}``,
        each chunk dropped after the last tile that reads it."""
        last: dict[tuple[str, tuple[int, int]], int] = {}
        for name in step.reads:
            store = self.stores.get(name)
            if self.plan.last_read.get(name) != k or store is None or store.whole is not None:
                continue
            for t, need in enumerate(regions):
                if name in need:
                    for key in store.touched(need[name]):
                        last[name, key] = t
        out: dict[int, list] = {}
        for (name, key), t in last.items():
            out.setdefault(t, []).append((name, key))
        return out


@functools.partial(jax.jit, static_argnums=0)
def _apply_attention(block: FlaxAttentionBlock, params: Any, x: jax.Array) -> jax.Array:
    return block.apply({"params": params}, x)


def _step_grid(plan: ExactPlan, k: int) -> Any:
    """The tiles of step ``k``: its own grid where the plan gives one per step, else the plan's grid."""
    grids = getattr(plan, "grids", None)
    return plan.grid if grids is None else grids[k]


def _regions(plan: ExactPlan, step: Pass, grid: Any, i: int, j: int) -> dict[str, Region]:
    if getattr(plan, "grids", None) is None:
        return plan.regions(step, i, j)
    return plan.regions(step, i, j, grid)


def _groups_reading(graph, name: str) -> int:
    groups = {n.groups for n in graph.nodes if n.op == NORM_ACT_CONV and n.inputs[0] == name}
    if len(groups) != 1:
        raise ValueError(f"the GroupNorms reading {name} disagree on the number of groups: {sorted(groups)}")
    return groups.pop()


def run_exact(module: Any, params: Any, plan: ExactPlan, x: jax.Array) -> jax.Array:
    """Decode latents or encode images (per ``plan.graph.kind``), NHWC in and out, following ``plan``.

    ``module`` is the FlaxAutoencoderKL (for its config and numerics), ``params`` its parameter tree.
    """
    if plan.graph[plan.graph.input].op != INPUT:
        raise ValueError("the plan's graph has no input node")
    if isinstance(x, jax.core.Tracer) or any(isinstance(p, jax.core.Tracer) for p in jax.tree_util.tree_leaves(params)):
        raise RuntimeError("exact tiling runs eagerly, freeing activations as it goes, and cannot be traced: call "
                           "model.apply outside jax.jit/grad/vmap, or use untiled or blend tiling there")
    return _Executor(module, params, plan).run(x)
