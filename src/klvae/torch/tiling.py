"""Tiled encode and decode for the PyTorch model; the tile plans live in :mod:`klvae.tiling`.

Three modes, one set of plain functions (the model's ``enable_tiling`` switch calls these):

- ``"exact"``: the untiled result, computed tile by tile (GroupNorm statistics combined over all tiles, the
  mid-block attention over the whole latent, halos covering the convolutions); memory bounded by a plan.
- ``"blend"``: diffusers' algorithm (tiles with their own statistics, blended linearly); diffusers' output.
- ``"auto"``: untiled when the estimated memory fits ``memory_limit`` (default: the memory available now),
  otherwise, or after an out-of-memory error, exact tiling within the limit. Same output either way.
- ``"distributed"``: the exact plan's tiles shared over the ranks of the initialised default torch.distributed
  process group (:mod:`klvae.torch.distributed_tiling`); every rank passes the same input and gets the whole,
  untiled result. One rank runs ``"exact"``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from klvae.tiling import (ALL_MODES, DEFAULT_MODE, DISTRIBUTED_MODE, BlendPlan, blend_ramp, decode_plan, encode_plan,
                          exact_plan_for, host_available_memory, run_planned)
from klvae.tiling_plan import ExactPlan
from klvae.torch import distributed_tiling
from klvae.torch.exact_tiling import run_exact

MODES = ALL_MODES + (DISTRIBUTED_MODE,)  # the exact plan shared over ranks too

__all__ = ["DEFAULT_MODE", "MODES", "available_memory", "blend_tiled_decode", "blend_tiled_encode_moments",
           "exact_plan", "tiled_decode", "tiled_encode"]


def tiled_decode(model, z: torch.Tensor, *, mode: str = DEFAULT_MODE, tile_sample_min_size: int | None = None,
                 tile_overlap_factor: float | None = None, memory_limit: float | None = None,
                 spill: bool | str = False) -> torch.Tensor:
    """Decode (B, latent_channels, h, w) latents to images in tiles.

    ``tile_sample_min_size``: tile side in output pixels (default: the model's ``tile_sample_min_size``);
    images no larger than one tile are decoded untiled. ``tile_overlap_factor``: blend mode only.
    ``memory_limit``: bytes of activations the exact plan should stay within (an estimate); ``None`` keeps
    every intermediate the plan can (fastest), except in ``"auto"`` mode where it is the available memory.
    ``spill``: to stay within the limit, exact plans may keep activations in temporary files (in the system's
    temporary folder, or in the folder given) instead of recomputing them (:mod:`klvae.tiling_spill`).
    """
    return _tiled(model, z, "decode", mode, tile_sample_min_size, tile_overlap_factor, memory_limit, spill)


def tiled_encode(model, x: torch.Tensor, *, mode: str = DEFAULT_MODE, tile_sample_min_size: int | None = None,
                 tile_overlap_factor: float | None = None, memory_limit: float | None = None,
                 spill: bool | str = False) -> torch.Tensor:
    """Encode (B, C, H, W) images to posterior moments (B, 2 * latent_channels, H / f, W / f) in tiles; the
    options are :func:`tiled_decode`'s, with ``tile_sample_min_size`` in input pixels."""
    return _tiled(model, x, "encode", mode, tile_sample_min_size, tile_overlap_factor, memory_limit, spill)


def _tiled(model, x: torch.Tensor, kind: str, mode: str, tile: int | None, overlap: float | None,
           memory_limit: float | None, spill: bool | str = False) -> torch.Tensor:
    tile, overlap = _sizes(model, tile, overlap)
    if memory_limit is not None and not memory_limit > 0:
        raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
    f = model.config.downsample_factor
    if mode == "blend":
        make_plan, run = (decode_plan, model._decode_latents) if kind == "decode" else (encode_plan, model._encode_moments)
        return _blend_tiles(x, make_plan(tile, tile // f, overlap), run)
    if mode == DISTRIBUTED_MODE:
        if spill:
            raise ValueError("tiling mode 'distributed' keeps stored activations in memory (split over the ranks); "
                             "spill files are for mode 'exact' or 'auto'")
        if distributed_tiling.world_size() > 1:
            _check_no_grad(model, x)
            latent_hw = _latent_hw(model, x, kind)
            return distributed_tiling.run_distributed(
                model, x, lambda available: exact_plan_for(model.config, kind, latent_hw, x.shape[0], x.element_size(),
                                                           tile, memory_limit, available),
                None if memory_limit is not None else available_memory(x.device))
        mode = "exact"
    if mode in ("exact", "auto"):
        return run_planned(mode, model.config, kind, _latent_hw(model, x, kind), x.shape[0], x.element_size(), tile,
                           memory_limit, untiled=lambda: _untiled(model, x, kind),
                           run_exact=lambda plan: _run_exact(model, plan, x, spill),
                           available_memory=lambda: available_memory(x.device), is_out_of_memory=is_out_of_memory,
                           release_memory=lambda: _release_memory(x.device), stacklevel=3, spill=bool(spill))
    raise ValueError(f"unknown tiling mode {mode!r}; choose one of {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------- exact
def exact_plan(model, x: torch.Tensor, kind: str, tile_sample_min_size: int | None = None,
               memory_limit: float | None = None) -> ExactPlan:
    """The exact tiling plan for decoding latents ``x`` (``kind="decode"``) or encoding images ``x``
    (see :func:`klvae.tiling.exact_plan_for`; ``memory_limit`` defaults to a share of :func:`available_memory`)."""
    tile, _ = _sizes(model, tile_sample_min_size, None)
    return exact_plan_for(model.config, kind, _latent_hw(model, x, kind), x.shape[0], x.element_size(), tile,
                          memory_limit, None if memory_limit is not None else available_memory(x.device))


def _latent_hw(model, x: torch.Tensor, kind: str) -> tuple[int, int]:
    f = 1 if kind == "decode" else model.config.downsample_factor
    return x.shape[2] // f, x.shape[3] // f


def _untiled(model, x: torch.Tensor, kind: str) -> torch.Tensor:
    return model._decode_latents(x) if kind == "decode" else model._encode_moments(x)


def _run_exact(model, plan: ExactPlan, x: torch.Tensor, spill: bool | str = False) -> torch.Tensor:
    _check_no_grad(model, x)
    return run_exact(model, plan, x, spill if isinstance(spill, str) else None)


def _check_no_grad(model, x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or (model.training and
                                                         any(p.requires_grad for p in model.parameters()))):
        raise RuntimeError("exact tiling runs without autograd (it frees activations as it goes); call it under "
                           "torch.no_grad() with the model in eval mode, or use untiled or blend mode to train")


# ---------------------------------------------------------------------------------------------- auto
def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take now: free device memory (plus the caching allocator's free blocks) on
    CUDA, the host's available memory on the CPU; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return host_available_memory()
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA, MPS or host)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                                or "not enough memory" in text.lower())


def _release_memory(device: torch.device) -> None:
    """Free what a failed untiled attempt left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- blend
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
