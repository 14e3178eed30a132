"""Blend tiling for the Flax model (NHWC inside); the tile plan lives in :mod:`klvae.tiling`.

Tiles are static slices, so a tiled encode/decode traces and jits like any other call (one compiled program per
input shape; edge tiles of a different size are traced once each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from klvae.tiling import BlendPlan, blend_ramp

__all__ = ["blend_tiles", "tiled_decode", "tiled_encode"]


def blend_tiles(x: jax.Array, plan: BlendPlan, run: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Run ``run`` on each (B, tile, tile, C) tile of ``x``, blend it into its upper and left neighbours, crop,
    stitch.

    Each tile is blended against neighbours that were themselves already blended, in diffusers' order (row by
    row, left to right), so the result equals the PyTorch backend's and diffusers' tiled output.
    """
    rows = [[run(x[:, i:i + plan.tile, j:j + plan.tile, :]) for j in plan.starts(x.shape[2])]
            for i in plan.starts(x.shape[1])]
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
