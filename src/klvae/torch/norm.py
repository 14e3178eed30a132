"""GroupNorm that stays precise on channels-last CPU tensors.

torch's channels-last GroupNorm kernel on the CPU takes the variance as E[x^2] - E[x]^2 in one pass, which
cancels catastrophically when a group's mean is large against its spread: measured with torch 2.13 on
N(1000, 1) inputs, 2.6e-1 relative error in float32 (1.4 in bfloat16) against 1.2e-5 for the contiguous kernel.
GroupNorm is invariant to adding a constant per (sample, group), so subtracting a cheap estimate of each group's
mean first (from a strided subsample) removes the cancellation: one elementwise pass, no layout change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klvae.config import NORM_EPS

_PILOT_STRIDE = 4  # the group-mean estimate reads every 4th row and column


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state_dict keys) with the channels-last CPU path made precise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.ndim == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            x = x - group_mean_estimate(x, self.num_groups)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


def group_mean_estimate(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, 1, 1): each channel gets the float32 mean of its group over a strided subsample, in ``x``'s dtype."""
    b, c = x.shape[:2]
    sample = x[:, :, ::_PILOT_STRIDE, ::_PILOT_STRIDE].float().mean(dim=(2, 3))          # (B, C)
    per_group = sample.view(b, groups, c // groups).mean(dim=2, keepdim=True)              # (B, G, 1)
    return per_group.expand(b, groups, c // groups).reshape(b, c, 1, 1).to(x.dtype)
