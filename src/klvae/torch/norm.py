"""GroupNorm with float32 statistics that stay precise in any memory layout (see :mod:`klvae.torch.fused`).

torch's channels-last GroupNorm kernel on the CPU takes the variance as E[x^2] - E[x]^2 in one pass, which
cancels catastrophically when a group's mean is large against its spread: measured with torch 2.13 on
N(1000, 1) inputs, 2.6e-1 relative error in float32 (1.4 in bfloat16) against 1.2e-5 for the contiguous kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from klvae.config import NORM_EPS
from klvae.torch.fused import group_norm_act


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state_dict keys) computed by :func:`group_norm_act`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(x, self)


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=NORM_EPS, affine=True)
