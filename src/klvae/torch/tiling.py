"""Tiled encode and decode for the PyTorch model; the tile plan lives in :mod:`klvae.tiling`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from klvae.tiling import MODES, BlendPlan, blend_ramp, decode_plan, encode_plan

__all__ = ["MODES", "blend_tiled_decode", "blend_tiled_encode_moments", "tiled_decode", "tiled_encode"]


def tiled_decode(model, z: torch.Tensor, *, tile_sample_min_size: int | None = None,
                 tile_overlap_factor: float | None = None) -> torch.Tensor:
    """Decode latents in blended tiles; sizes default to the model's tiling attributes."""
    tile, overlap = _sizes(model, tile_sample_min_size, tile_overlap_factor)
    return _blend_tiles(z, decode_plan(tile, tile // model.config.downsample_factor, overlap),
                        model._decode_latents)


def tiled_encode(model, x: torch.Tensor, *, tile_sample_min_size: int | None = None,
                 tile_overlap_factor: float | None = None) -> torch.Tensor:
    """Encode images to posterior moments in blended tiles; sizes default to the model's tiling attributes."""
    tile, overlap = _sizes(model, tile_sample_min_size, tile_overlap_factor)
    return _blend_tiles(x, encode_plan(tile, tile // model.config.downsample_factor, overlap),
                        model._encode_moments)


def blend_tiled_decode(model, z: torch.Tensor) -> torch.Tensor:
    """Decode with the model's own tiling attributes (as diffusers' ``tiled_decode``)."""
    plan = decode_plan(model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor)
    return _blend_tiles(z, plan, model._decode_latents)


def blend_tiled_encode_moments(model, x: torch.Tensor) -> torch.Tensor:
    """Encode with the model's own tiling attributes (as diffusers' ``_tiled_encode``)."""
    plan = encode_plan(model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor)
    return _blend_tiles(x, plan, model._encode_moments)


def _sizes(model, tile: int | None, overlap: float | None) -> tuple[int, float]:
    tile = model.tile_sample_min_size if tile is None else tile
    f = model.config.downsample_factor
    if tile < f or tile % f:
        raise ValueError(f"tile_sample_min_size must be a positive multiple of {f}, got {tile}")
    return tile, model.tile_overlap_factor if overlap is None else overlap


def _blend_tiles(x: torch.Tensor, plan: BlendPlan, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``run`` on each tile, blend each tile into its upper and left neighbours, crop and stitch.

    Blending writes into the tile in place and later tiles blend against already-blended neighbours, exactly
    as diffusers does, so the output matches diffusers' tiled output.
    """
    rows = [[run(x[:, :, i:i + plan.tile, j:j + plan.tile]) for j in plan.starts(x.shape[3])]
            for i in plan.starts(x.shape[2])]
    stitched_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend_into(rows[i - 1][j], tile, plan.blend_extent, dim=2)
            if j > 0:
                _blend_into(row[j - 1], tile, plan.blend_extent, dim=3)
            kept.append(tile[:, :, :plan.row_limit, :plan.row_limit])
        stitched_rows.append(torch.cat(kept, dim=3))
    return torch.cat(stitched_rows, dim=2)


def _blend_into(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Mix the last ``extent`` rows (dim 2) or columns (dim 3) of ``prev`` into the first ones of ``tile``."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return
    keep_prev, take_new = (torch.from_numpy(w).to(device=tile.device, dtype=tile.dtype) for w in blend_ramp(extent))
    shape = (extent, 1) if dim == 2 else (extent,)
    head = tile.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * keep_prev.view(shape) + head * take_new.view(shape))
