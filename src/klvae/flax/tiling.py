"""Tiling for the Flax model (NHWC inside), in the PyTorch backend's three modes; the plans are shared.

- ``"blend"``: diffusers' algorithm (:mod:`klvae.tiling`); diffusers' tiled output. Traceable: works under jit.
- ``"exact"``: the untiled output computed tile by tile with bounded memory (:mod:`klvae.tiling_plan`, run by
  :mod:`klvae.flax.exact_tiling`). Eagerly or under ``jax.jit``.
- ``"auto"``: untiled when the estimated memory fits (also under jit), otherwise, or after an out-of-memory
  error, exact tiling.
- ``"sharded"``: the untiled output in row bands over a mesh axis (:mod:`klvae.flax.sharded`).

Blend tiling:

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

from klvae import tiling as shared
from klvae.tiling import ALL_MODES, SHARDED_MODE, BlendPlan, blend_ramp
from klvae.tiling_plan import ExactPlan

MODES = ALL_MODES + (SHARDED_MODE,)  # row bands over a mesh axis too

__all__ = ["MODES", "available_memory", "blend_tiles", "exact_plan", "run_planned", "tiled_decode", "tiled_encode"]

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


def tiled_decode(model: Any, params: Any, latents: jax.Array, *, mode: str = "blend",
                 tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None,
                 memory_limit: float | None = None, mesh: Any = None, axis: str | None = None) -> jax.Array:
    """Decode (B, C, h, w) latents in tiles; sizes default to the model's tiling fields.

    ``"blend"`` always tiles; ``"exact"`` and ``"auto"`` run untiled when the input fits one tile (or, for auto,
    memory), as the PyTorch backend's do. ``memory_limit``: activation bytes an exact plan stays within.
    ``mesh``, ``axis``: the "sharded" mode's mesh and the axis its row bands go over.
    """
    tiled = model.with_tiling(mode, tile_sample_min_size=tile_sample_min_size, tile_overlap_factor=tile_overlap_factor,
                              memory_limit=memory_limit, mesh=mesh, axis=axis)
    method = type(model).tiled_decode if mode == "blend" else type(model).decode
    return tiled.apply({"params": params}, latents, method=method).sample


def tiled_encode(model: Any, params: Any, sample: jax.Array, *, mode: str = "blend",
                 tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None,
                 memory_limit: float | None = None, mesh: Any = None, axis: str | None = None) -> Any:
    """Encode (B, C, H, W) images in tiles to the posterior; options as :func:`tiled_decode`'s."""
    tiled = model.with_tiling(mode, tile_sample_min_size=tile_sample_min_size, tile_overlap_factor=tile_overlap_factor,
                              memory_limit=memory_limit, mesh=mesh, axis=axis)
    method = type(model).tiled_encode if mode == "blend" else type(model).encode
    return tiled.apply({"params": params}, sample, method=method).latent_dist


# ---------------------------------------------------------------------------------------------- exact / auto
def exact_plan(model: Any, x: jax.Array, kind: str, tile_sample_min_size: int,
               memory_limit: float | None = None) -> ExactPlan:
    """The exact plan for decoding latents ``x`` (``kind="decode"``) or encoding images ``x``, NHWC (see
    :func:`klvae.tiling.exact_plan_for`; ``memory_limit`` defaults to a share of :func:`available_memory`)."""
    return shared.exact_plan_for(model.config, kind, _latent_hw(model, x, kind), x.shape[0],
                                 jnp.dtype(model.dtype).itemsize, tile_sample_min_size, memory_limit,
                                 None if memory_limit is not None else available_memory(_device(x)))


def fits_untiled(model: Any, x: jax.Array, kind: str, memory_limit: float | None) -> bool:
    """Whether "auto" runs ``x`` untiled (:func:`klvae.tiling.fits_untiled`)."""
    return shared.fits_untiled(model.config, kind, _latent_hw(model, x, kind), x.shape[0],
                               jnp.dtype(model.dtype).itemsize, memory_limit,
                               None if memory_limit is not None else available_memory(_device(x)))


def run_planned(model: Any, x: jax.Array, kind: str, untiled: Callable[[], jax.Array],
                run_exact: Callable[[ExactPlan], jax.Array], stacklevel: int = 3) -> jax.Array:
    """The model's "exact" or "auto" tiling of NHWC ``x`` (:func:`klvae.tiling.run_planned`): ``untiled()`` where
    the plan or memory allows, else ``run_exact(plan)``. A traced input never falls back after an error.
    ``stacklevel``: the "no plan fits" warning's, counted from the caller (the default suits the model's
    ``_planned``, called from ``decode``/``encode`` through one helper)."""
    return shared.run_planned(
        model.tiling_mode, model.config, kind, _latent_hw(model, x, kind), x.shape[0], jnp.dtype(model.dtype).itemsize,
        model._tile_sizes()[0], model.tiling_memory_limit, untiled=untiled, run_exact=run_exact,
        available_memory=lambda: available_memory(_device(x)),
        is_out_of_memory=lambda e: is_out_of_memory(e) and not isinstance(x, jax.core.Tracer),
        stacklevel=stacklevel + 1)


def is_out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def available_memory(device: Any) -> int | None:
    """Bytes a new allocation can take now: the accelerator's free memory (from ``memory_stats``), or
    ``MemAvailable`` for the host CPU; None where unknown."""
    stats = None
    if device is not None and device.platform != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # not every backend reports
            stats = None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return None
    return shared.host_available_memory()


def _latent_hw(model: Any, x: jax.Array, kind: str) -> tuple[int, int]:
    f = 1 if kind == "decode" else model.config.downsample_factor
    return x.shape[1] // f, x.shape[2] // f


def _device(x: jax.Array) -> Any:
    if isinstance(x, jax.core.Tracer):
        return jax.devices()[0]
    return next(iter(x.devices()))
