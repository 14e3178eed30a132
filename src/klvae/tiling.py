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

import numpy as np

# Every tiling mode. Each backend checks against the modes it runs: the PyTorch backend all of them
# (klvae.torch.tiling.MODES); MODES lists those every backend runs.
ALL_MODES = ("exact", "blend", "auto")
MODES = ("blend",)
# The PyTorch backend's default: exact tiling gives the untiled result and measured faster than blend (docs/tiling.md).
# The Flax backend keeps "blend", which runs under jit.
DEFAULT_MODE = "exact"


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
