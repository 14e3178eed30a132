"""Encode and decode split into row bands over one axis of a ``jax.sharding.Mesh``: the untiled result, with each
device holding about 1/N of every activation.

The model runs as the graph of local operations that exact tiling plans over (:mod:`klvae.tiling_graph`), inside
one ``jax.shard_map``: device k owns rows ``[k R, (k + 1) R)`` of the latent (``R = ceil(h / N)``; the same band at
every resolution, scaled), and

- every convolution first receives its halo rows from the neighbouring bands by ``lax.ppermute`` (the image's
  top and bottom edges receive zeros: the convolution's own zero padding);
- every GroupNorm gathers each band's (count, mean, M2) per group with ``lax.all_gather`` and merges them in
  band order with Chan's formula (:class:`~klvae.flax.exact_tiling.GroupNormStats`), so its statistics are the
  whole tensor's;
- the mid-block attention gathers the latent-resolution activation once (1/64 of the image's pixels in the SD
  architecture) for its keys, values and GroupNorm statistics; each device attends with its own band's queries.

Rows that do not divide evenly are padded at the bottom to ``N R`` latent rows; the padded rows are zeroed before
every convolution and left out of every GroupNorm's statistics, so they change nothing, and they are cropped from
the result. The per-node kernels are exact tiling's (:mod:`klvae.flax.exact_tiling`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from klvae.errors import ConfigError
from klvae.flax.exact_tiling import FlaxTileOps, GroupNormStats, _conv, _up_conv, norm_act
from klvae.tiling_graph import ADD, CONV, DOWN_CONV, GLOBAL, INPUT, NORM_ACT_CONV, UP_CONV, Node
from klvae.tiling_plan import graph_for


def check_mesh(mesh: Any, axis: str | None) -> str:
    """The mesh axis to split rows over (``axis``, or the mesh's only axis); a ConfigError names what is wrong."""
    if not isinstance(mesh, Mesh):
        raise ConfigError(f'tiling_mode "sharded" needs a jax.sharding.Mesh (with_tiling("sharded", mesh=..., '
                          f'axis=...)), got {type(mesh).__name__}')
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ConfigError(f"the mesh has axes {mesh.axis_names}; name the one to split rows over with axis=")
        return mesh.axis_names[0]
    if axis not in mesh.shape:
        raise ConfigError(f"the mesh has no axis {axis!r} (axes: {', '.join(mesh.axis_names)})")
    return axis


def run_sharded(module: Any, params: Any, kind: str, x: jax.Array, mesh: Mesh, axis: str | None = None) -> jax.Array:
    """Decode latents or encode images (``kind``), NHWC in and out, in row bands over ``mesh`` axis ``axis``.

    Works eagerly and under ``jax.jit``; the result is laid out in the same row bands where the latent rows split
    evenly over the axis, else gathered whole on every device.
    """
    axis = check_mesh(mesh, axis)
    graph = graph_for(module.config, kind)
    n = mesh.shape[axis]
    scale_in = graph[graph.input].scale
    latent_rows = x.shape[1] // scale_in
    band = math.ceil(latent_rows / n)  # latent rows per device
    padded = jnp.pad(x, ((0, 0), (0, (n * band - latent_rows) * scale_in), (0, 0), (0, 0)))
    rows, whole = PartitionSpec(None, axis), PartitionSpec()
    bands = Bands(module, graph, axis, n, band, latent_rows)
    run = jax.shard_map(bands.run, mesh=mesh, in_specs=(whole, rows), out_specs=rows)
    out = run(jax.tree_util.tree_map(lambda p: place(p, mesh, whole), params), place(padded, mesh, rows))
    if n * band == latent_rows:
        return out
    # Uneven bands: the padding rows go, and the result is gathered whole (a band layout needs equal bands).
    return place(out, mesh, whole)[:, :latent_rows * graph[graph.output].scale]


def place(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """``x`` laid out as ``spec`` on ``mesh`` (explicit axes: resharded; automatic ones: constrained)."""
    sharding = NamedSharding(mesh, spec)
    if AxisType.Explicit in getattr(mesh, "axis_types", ()):
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


class Bands:
    """The per-device program: every node of ``graph`` over this device's band of rows."""

    def __init__(self, module: Any, graph: Any, axis: str, devices: int, band: int, latent_rows: int):
        self.module, self.graph, self.axis = module, graph, axis
        self.devices, self.band, self.latent_rows = devices, band, latent_rows

    def run(self, params: Any, x: jax.Array) -> jax.Array:
        self.ops = FlaxTileOps(self.module, params, traced=True)
        values: dict[str, jax.Array] = {}
        for node in self.graph.nodes:
            values[node.name] = x if node.op == INPUT else self.compute(node, values)
        return values[self.graph.output]

    # ------------------------------------------------------------------ rows
    def valid_rows(self, scale: int) -> jax.Array:
        """Rows of this device's band (at ``scale``) that lie inside the image (the rest is bottom padding)."""
        first = jax.lax.axis_index(self.axis) * self.band * scale
        return jnp.clip(self.latent_rows * scale - first, 0, self.band * scale)

    def row_mask(self, scale: int) -> jax.Array:
        return (jnp.arange(self.band * scale) < self.valid_rows(scale))[None, :, None, None]

    def masked(self, x: jax.Array, scale: int) -> jax.Array:
        """``x`` with the padding rows zeroed (exact only when the band has padding rows at all)."""
        if self.devices * self.band == self.latent_rows:
            return x
        return jnp.where(self.row_mask(scale), x, jnp.zeros((), x.dtype))

    def with_halo(self, x: jax.Array, above: int, below: int) -> jax.Array:
        """``x`` with ``above`` rows of the band above and ``below`` of the band below (zeros at the edges)."""
        parts = [x]
        n = self.devices
        if above:
            parts.insert(0, jax.lax.ppermute(x[:, -above:], self.axis, [(k, k + 1) for k in range(n - 1)]))
        if below:
            parts.append(jax.lax.ppermute(x[:, :below], self.axis, [(k + 1, k) for k in range(n - 1)]))
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else x

    # ------------------------------------------------------------------ statistics
    def norm(self, node: Node, x: jax.Array, scale: int) -> tuple[jax.Array, jax.Array]:
        """The GroupNorm's (scale, shift) from the moments of the whole ``x``, gathered from every band."""
        groups = node.groups
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
        mask = self.row_mask(scale)[..., None]
        count = (self.valid_rows(scale) * w * (c // groups)).astype(jnp.float32)
        mean = jnp.where(mask, g, 0.0).sum(axis=(1, 2, 4)) / jnp.maximum(count, 1.0)
        m2 = jnp.where(mask, jnp.square(g - mean[:, None, None, :, None]), 0.0).sum(axis=(1, 2, 4))
        counts, means, m2s = (jax.lax.all_gather(a, self.axis) for a in (count, mean, m2))
        stats = GroupNormStats(groups, host=False)
        for k in range(self.devices):  # in band order: every device merges identically
            stats.add(counts[k], means[k], m2s[k])
        return self.ops.scale_shift(node, stats)

    # ------------------------------------------------------------------ one node over the band
    def compute(self, node: Node, values: dict[str, jax.Array]) -> jax.Array:
        ops = self.ops
        x = values[node.inputs[0]]
        scale = self.graph[node.inputs[0]].scale
        if node.op == ADD:
            return x + values[node.inputs[1]]
        if node.op == GLOBAL:
            return self.global_step(node, x, scale)
        if node.op == NORM_ACT_CONV:
            x = norm_act(x, *self.norm(node, x, scale), ops.activation_name(node.act))
        params = ops.tree(node.conv)
        kernel, bias = params["kernel"], params["bias"]
        x = self.masked(x, scale)
        if node.op == UP_CONV:  # the upsampled band plus one row each side: a 3x3 conv's halo
            return _up_conv(self.with_halo(x, 1, 1), kernel, bias, start=(1, 1, 0, 0), pads=(0, 0, 1, 1),
                            **ops.numerics)
        if node.op == DOWN_CONV:  # pad (0, 1, 0, 1), stride 2: output row r reads input rows 2r .. 2r + 2
            return _conv(self.with_halo(x, 0, 1), kernel, bias, pads=(0, 0, 0, 1), stride=2, **ops.numerics)
        if node.op in (CONV, NORM_ACT_CONV):
            p = node.kernel // 2
            return _conv(self.with_halo(x, p, p), kernel, bias, pads=(0, 0, p, p), stride=1, **ops.numerics)
        raise ValueError(f"cannot compute a {node.op} node over a band")

    def global_step(self, node: Node, x: jax.Array, scale: int) -> jax.Array:
        """The attention for this band's queries, over keys and values (and GroupNorm statistics) of the whole
        tensor, gathered from every band with the padding rows cropped."""
        rows = self.band * scale
        whole = jax.lax.all_gather(x, self.axis, axis=1, tiled=True)[:, :self.latent_rows * scale]
        b, h, w, c = whole.shape
        # scores in query chunks no larger than the band's own activation (one device's share of the memory)
        block = self.ops.attention_block(c, b, rows * w, h * w, max_scores_bytes=b * rows * w * c * 4)
        start = jax.lax.axis_index(self.axis) * rows
        return block.apply({"params": self.ops.tree(node.module)}, whole, start, rows, method="band")


__all__ = ["Bands", "check_mesh", "run_sharded"]
