"""Blend tiling for the Flax model (NHWC inside); the tile plan lives in :mod:`klvae.tiling`.

Tiles of equal shape are stacked and run one after another in a ``jax.lax.map``: the network is traced once per
distinct tile shape (at most four: interior, right edge, bottom edge, corner) however many tiles there are, and
only one tile's activations are alive at a time, which is the point of tiling. Blending and stitching are cheap
static slices, unrolled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from klvae.tiling import BlendPlan, blend_ramp

__all__ = ["blend_tiles", "tiled_decode", "tiled_encode"]

Start = tuple[int, int]


def blend_tiles(x: jax.Array, plan: BlendPlan, run: Callable[[jax.Array], jax.Array], *,
                loop: bool = True) -> jax.Array:
    """Run ``run`` on each (B, tile, tile, C) tile of ``x``, blend it into its upper and left neighbours, crop,
    stitch.

    Each tile is blended against neighbours that were themselves already blended, in diffusers' order (row by
    row, left to right), so the result equals the PyTorch backend's and diffusers' tiled output. ``run`` must be
    a pure function when ``loop`` is true (tiles go through ``lax.map``); with ``loop=False`` each tile is a
    separate call (needed while a linen module initialises).
    """
    row_starts, col_starts = plan.starts(x.shape[1]), plan.starts(x.shape[2])
    outputs = _run_tiles(x, [(i, j) for i in row_starts for j in col_starts], plan.tile, run, loop)
    rows = [[outputs[(i, j)] for j in col_starts] for i in row_starts]
    stitched = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, plan.blend_extent, axis=1)
            if j > 0:
                tile = _blend(row[j - 1], tile, plan.blend_extent, axis=2)
            row[j] = tile  # later neighbours blend against this blended tile
        stitched.append(jnp.concatenate([t[:, :plan.row_limit, :plan.row_limit, :] for t in row], axis=2))
    return jnp.concatenate(stitched, axis=1)


def _run_tiles(x: jax.Array, starts: list[Start], tile: int, run: Callable[[jax.Array], jax.Array],
               loop: bool) -> dict[Start, jax.Array]:
    """``{start: run(tile at start)}``, one ``lax.map`` per distinct tile shape."""
    def cut(i: int, j: int) -> jax.Array:
        return x[:, i:i + tile, j:j + tile, :]

    if not loop:
        return {start: run(cut(*start)) for start in starts}
    groups: dict[tuple[int, int], list[Start]] = {}
    for i, j in starts:
        groups.setdefault((min(tile, x.shape[1] - i), min(tile, x.shape[2] - j)), []).append((i, j))
    outputs: dict[Start, jax.Array] = {}
    for members in groups.values():
        results = jax.lax.map(run, jnp.stack([cut(*start) for start in members]))
        outputs.update((start, results[k]) for k, start in enumerate(members))
    return outputs


def _blend(prev: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """Mix the last ``extent`` rows (axis 1) or columns (axis 2) of ``prev`` into the first ones of ``tile``."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    keep_prev, take_new = (jnp.asarray(w, dtype=tile.dtype) for w in blend_ramp(extent))
    shape = (extent, 1, 1) if axis == 1 else (extent, 1)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
    tail = jax.lax.slice_in_dim(prev, prev.shape[axis] - extent, prev.shape[axis], axis=axis)
    mixed = tail * keep_prev.reshape(shape) + head * take_new.reshape(shape)
    rest = jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)
    return jnp.concatenate([mixed.astype(tile.dtype), rest], axis=axis)


def tiled_decode(model: Any, params: Any, latents: jax.Array, *, tile_sample_min_size: int | None = None,
                 tile_overlap_factor: float | None = None) -> jax.Array:
    """Decode (B, C, h, w) latents in blended tiles; sizes default to the model's tiling fields."""
    tiled = _with_sizes(model, tile_sample_min_size, tile_overlap_factor)
    return tiled.apply({"params": params}, latents, method=type(model).tiled_decode).sample


def tiled_encode(model: Any, params: Any, sample: jax.Array, *, tile_sample_min_size: int | None = None,
                 tile_overlap_factor: float | None = None) -> Any:
    """Encode (B, C, H, W) images in blended tiles to the posterior; sizes default to the model's tiling fields."""
    tiled = _with_sizes(model, tile_sample_min_size, tile_overlap_factor)
    return tiled.apply({"params": params}, sample, method=type(model).tiled_encode).latent_dist


def _with_sizes(model: Any, tile: int | None, overlap: float | None) -> Any:
    changes: dict[str, Any] = {}
    if tile is not None:
        changes["tile_sample_min_size"] = tile
    if overlap is not None:
        changes["tile_overlap_factor"] = overlap
    return model.clone(**changes) if changes else model
