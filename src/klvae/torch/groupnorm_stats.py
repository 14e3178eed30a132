"""GroupNorm statistics accumulated over tiles, combined exactly (parallel variance), and applied to a tile."""

from __future__ import annotations

import torch
from torch import nn

from klvae.tiling_executor import GroupMoments


class GroupNormStats(GroupMoments):
    """Per-(batch, group) count, mean and sum of squared deviations of a tensor seen one tile at a time.

    Tiles are combined with Chan et al.'s parallel formula in float64 (:func:`klvae.tiling.merge_moments`): for parts a and b,
    ``mean = mean_a + d * n_b / n`` and ``M2 = M2_a + M2_b + d**2 * n_a * n_b / n`` with ``d = mean_b - mean_a``.
    The last term, the spread of the tile means, is what averaging per-tile variances leaves out. Each tile's own
    mean and variance come from the GroupNorm kernel itself (``torch.native_group_norm``, the statistics untiled
    GroupNorm computes, at its speed), so the result is the biased variance GroupNorm uses, over the whole tensor.
    """

    def part_count(self, x: torch.Tensor) -> int:
        return (x.shape[1] // self.groups) * x.shape[2] * x.shape[3]

    def part_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of a (B, C, h, w) tile (any strides)."""
        b, c = x.shape[:2]
        hw = x.shape[2] * x.shape[3]
        _, mean, rstd = torch.native_group_norm(x.contiguous(), None, None, b, c, hw, self.groups, 0.0)
        # eps 0: rstd = var ** -0.5 (inf when var is 0)
        return mean.double(), rstd.double().pow(-2) * self.part_count(x)

    def variance(self) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("no tiles were added to these GroupNorm statistics")
        return self.m2 / self.count

    def scale_shift(self, norm: nn.GroupNorm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, C, 1, 1), such that ``norm(x) == x * scale + shift`` over the whole tensor."""
        if norm.num_groups != self.groups:
            raise ValueError(f"statistics over {self.groups} groups cannot serve a GroupNorm of {norm.num_groups}")
        rstd = (self.variance() + norm.eps).rsqrt()                      # (B, G)
        per_group = norm.num_channels // self.groups
        rstd = rstd.repeat_interleave(per_group, dim=1)                   # (B, C)
        mean = self.mean.repeat_interleave(per_group, dim=1)
        if norm.affine:
            weight, bias = norm.weight.detach().double(), norm.bias.detach().double()
            scale, shift = rstd * weight, bias - mean * rstd * weight
        else:
            scale, shift = rstd, -mean * rstd
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return scale.to(work)[..., None, None], shift.to(work)[..., None, None]


def apply_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` in one kernel (in float32 for half-precision inputs), as GroupNorm's CPU kernel
    applies its statistics."""
    if x.dtype == scale.dtype:
        return torch.addcmul(shift, x, scale)
    return torch.addcmul(shift, x.to(scale.dtype), scale).to(x.dtype)
