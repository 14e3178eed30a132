"""Tile plans shared by both backends (no torch, no jax).

"exact" tiling (the plan is in :mod:`klvae.tiling_plan`, the graph it schedules in :mod:`klvae.tiling_graph`)
computes the untiled result tile by tile. "auto" runs untiled when the estimated memory fits, exact tiling
otherwise.

"blend" tiling is diffusers' algorithm: tiles of ``tile`` input pixels start every ``stride`` pixels; each
decoded tile overlaps its upper and left neighbours by ``blend_extent`` output pixels, where the two are mixed
with a linear ramp, and is then cropped to ``row_limit`` output pixels.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from klvae.config import AutoencoderKLConfig
from klvae.tiling_plan import ExactPlan, plan_exact, untiled_estimate

# The tiling modes every backend runs on one device. Each backend adds its own way of spreading one image over
# several devices: klvae.torch.tiling.MODES the exact plan shared over torch.distributed ranks
# (DISTRIBUTED_MODE), klvae.flax.tiling.MODES row bands over a jax Mesh axis (SHARDED_MODE).
ALL_MODES = ("exact", "blend", "auto")
DISTRIBUTED_MODE = "distributed"
SHARDED_MODE = "sharded"
# The PyTorch backend's default: exact tiling gives the untiled result and measured faster than blend (docs/tiling.md).
# The Flax backend keeps "blend", which runs under jit.
DEFAULT_MODE = "exact"
# Exact tiles are at most this many pixels wide: the plan keeps about one tile's worth of data beyond the
# stored activations, and on CPU and GPU alike a 256-pixel tile is large enough to run convolutions at speed.
EXACT_TILE_SIZE = 256
# With the tile size left at the config's sample_size, exact plans split inputs larger than this many pixels: a
# sample_size of 1024 (SDXL, SD3, FLUX, FLUX.2) would otherwise leave a 1024x1024 image, where memory runs out
# (FLUX.2's decode: 4.6 GB in fp32), in one piece.
EXACT_MAX_UNTILED = 512
# Without a memory_limit, exact plans stay within this fraction of the memory available when they are made.
DEFAULT_MEMORY_FRACTION = 0.5
# "auto" runs untiled when the estimate fits this fraction of the available memory (estimates are +-20%).
AUTO_MEMORY_FRACTION = 0.8

T = TypeVar("T")


def host_available_memory() -> int | None:
    """Bytes the host can allocate now: ``MemAvailable`` from /proc/meminfo, else psutil's figure, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def exact_plan_for(config: AutoencoderKLConfig, kind: str, latent_hw: tuple[int, int], batch: int, itemsize: int,
                   tile_sample_min_size: int, memory_limit: float | None, available: int | None,
                   spill: bool = False) -> ExactPlan:
    """Each backend's exact plan: inputs no larger than ``tile_sample_min_size`` pixels get a one-tile plan
    (they run untiled); larger ones tiles of ``min(tile_sample_min_size, EXACT_TILE_SIZE)`` pixels. A
    ``tile_sample_min_size`` equal to the config's sample_size (the default) counts as at most
    ``EXACT_MAX_UNTILED``. ``memory_limit`` defaults to ``DEFAULT_MEMORY_FRACTION`` of ``available`` (bytes free
    now, None: unknown). ``spill``: the plan may keep activations in files to stay within the limit."""
    f = config.downsample_factor
    tile = tile_sample_min_size
    if tile == config.sample_height_width[0]:
        tile = min(tile, EXACT_MAX_UNTILED)
    if max(latent_hw) > tile // f:
        tile = min(tile, max(EXACT_TILE_SIZE // f * f, f))
    if memory_limit is None and available is not None:
        # Rounded down to 64 MiB, so that plans (cached per limit) are reused while the free memory jitters.
        memory_limit = (int(DEFAULT_MEMORY_FRACTION * available) >> 26) << 26
    return plan_exact(config, kind, tuple(latent_hw), batch, itemsize, tile // f,
                      None if memory_limit is None else float(memory_limit), spill=spill)


def fits_untiled(config: AutoencoderKLConfig, kind: str, latent_hw: tuple[int, int], batch: int, itemsize: int,
                 memory_limit: float | None, available: int | None) -> bool:
    """Whether "auto" runs untiled: the estimated untiled peak within ``memory_limit`` (default:
    ``AUTO_MEMORY_FRACTION`` of ``available``; unknown memory counts as fitting)."""
    if memory_limit is None:
        if available is None:
            return True
        memory_limit = AUTO_MEMORY_FRACTION * available
    peak, _ = untiled_estimate(config, kind, tuple(latent_hw), batch, itemsize)
    return peak <= memory_limit


def run_planned(mode: str, config: AutoencoderKLConfig, kind: str, latent_hw: tuple[int, int], batch: int,
                itemsize: int, tile_sample_min_size: int, memory_limit: float | None, *, untiled: Callable[[], T],
                run_exact: Callable[[ExactPlan], T], available_memory: Callable[[], int | None],
                is_out_of_memory: Callable[[BaseException], bool], release_memory: Callable[[], None] = lambda: None,
                stacklevel: int = 2, spill: bool = False) -> T:
    """"exact" or "auto" tiling, for any backend: ``untiled()`` where the plan (or, for auto, memory) allows,
    else ``run_exact(plan)``.

    "exact": the plan of :func:`exact_plan_for`; an input that fits one tile runs untiled. "auto": untiled when
    the estimate fits (:func:`fits_untiled`), else exact tiling within ``memory_limit`` (default:
    ``AUTO_MEMORY_FRACTION`` of ``available_memory()``); an out-of-memory error of the untiled attempt
    (``MemoryError`` or ``is_out_of_memory``) falls back to exact tiling within half the limit (default: half the
    memory available once ``release_memory()`` has freed what the failed attempt left), after leaving the
    ``except`` block so that its tensors are freed first. ``stacklevel``: the "no plan fits" warning's, counted
    from the caller of this function (1: that caller). ``spill``: exact plans may keep activations in files.
    """
    limit = memory_limit
    if mode == "auto":
        available = None if memory_limit is not None else available_memory()
        if not fits_untiled(config, kind, latent_hw, batch, itemsize, memory_limit, available):
            limit = AUTO_MEMORY_FRACTION * available if memory_limit is None else memory_limit
        else:
            try:
                return untiled()
            except (RuntimeError, MemoryError) as error:
                if not (isinstance(error, MemoryError) or is_out_of_memory(error)):
                    raise
            release_memory()
            retry_limit = available_memory() if memory_limit is None else memory_limit
            limit = None if retry_limit is None else retry_limit / 2
    plan = exact_plan_for(config, kind, latent_hw, batch, itemsize, tile_sample_min_size, limit,
                          None if limit is not None else available_memory(), spill)
    if plan.grid.count == 1:  # fits one tile: nothing to split
        return untiled()
    if limit is not None and plan.peak_bytes > limit:
        warnings.warn(f"exact tiling: no plan found within memory_limit={limit:.3g} bytes; the leanest plan found "
                      f"needs about {plan.peak_bytes:.3g}", ResourceWarning, stacklevel=stacklevel + 1)
    return run_exact(plan)


def merge_moments(count_a: int, mean_a, m2_a, count_b: int, mean_b, m2_b):
    """Count, mean and sum of squared deviations of two disjoint parts combined (Chan et al.'s parallel formula):
    ``mean = mean_a + d * n_b / n``, ``M2 = M2_a + M2_b + d**2 * n_a * n_b / n`` with ``d = mean_b - mean_a``.
    Arithmetic only, so numpy arrays and torch tensors both work (exact tiling's GroupNorm statistics use it)."""
    total = count_a + count_b
    delta = mean_b - mean_a
    return total, mean_a + delta * (count_b / total), m2_a + m2_b + delta * delta * (count_a * count_b / total)


@dataclasses.dataclass(frozen=True)
class BlendPlan:
    tile: int          # tile side in input pixels (latents for decode, image pixels for encode)
    stride: int        # distance between tile starts, input pixels
    blend_extent: int  # overlap mixed between neighbours, output pixels
    row_limit: int     # output pixels kept from each tile

    def starts(self, length: int) -> range:
        """Tile start positions along an input axis of ``length`` pixels (edge tiles are truncated)."""
        return range(0, length, self.stride)


def decode_plan(tile_sample_min_size: int, tile_latent_min_size: int, overlap_factor: float) -> BlendPlan:
    blend = int(tile_sample_min_size * overlap_factor)
    return BlendPlan(tile=tile_latent_min_size, stride=_stride(tile_latent_min_size, overlap_factor),
                     blend_extent=blend, row_limit=tile_sample_min_size - blend)


def encode_plan(tile_sample_min_size: int, tile_latent_min_size: int, overlap_factor: float) -> BlendPlan:
    blend = int(tile_latent_min_size * overlap_factor)
    return BlendPlan(tile=tile_sample_min_size, stride=_stride(tile_sample_min_size, overlap_factor),
                     blend_extent=blend, row_limit=tile_latent_min_size - blend)


def _stride(tile: int, overlap_factor: float) -> int:
    stride = int(tile * (1 - overlap_factor))
    if stride < 1:
        raise ValueError(f"a tile of {tile} pixels with overlap {overlap_factor} leaves no stride")
    return stride


def blend_ramp(extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (previous tile, this tile) across an overlap of ``extent`` pixels: ``1 - y/e`` and ``y/e``.

    Computed in float64 and rounded once, as the scalar arithmetic of diffusers' per-row loop is.
    """
    ramp = np.arange(extent, dtype=np.float64) / extent
    return 1.0 - ramp, ramp
