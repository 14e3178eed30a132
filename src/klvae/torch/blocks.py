"""Building blocks of the encoder and decoder, named as diffusers names them (the state_dict keys follow)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from klvae.config import NORM_EPS
from klvae.torch.attention import Attention

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU,
}
# Largest tensor F.interpolate indexes safely (it uses 32-bit indices on some paths).
_INT32_LIMIT = 2**31 - 1


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock2D(nn.Module):
    """``x + conv2(act(norm2(conv1(act(norm1(x))))))``, with a 1x1 ``conv_shortcut`` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            # In training, a contiguous input keeps DDP's gradient strides consistent (diffusers does the same).
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return x + h


class Downsample2D(nn.Module):
    """Halve H and W: pad one row and column at the bottom and right, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest_2x(x))


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling that stays correct past 2**31 output elements (done in channel slices there)."""
    b, c, h, w = x.shape
    per_channel = b * 4 * h * w
    if per_channel * c <= _INT32_LIMIT:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if per_channel > _INT32_LIMIT:
        raise ValueError(f"cannot upsample a tensor of shape {tuple(x.shape)}: one channel of the output alone "
                         "exceeds 2**31 elements; decode with slicing or tiling")
    step = max(1, _INT32_LIMIT // per_channel)
    out = x.new_empty(b, c, 2 * h, 2 * w, memory_format=_memory_format(x))
    for start in range(0, c, step):
        out[:, start:start + step] = F.interpolate(x[:, start:start + step], scale_factor=2.0, mode="nearest")
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention (optional) -> resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2)])
        self.gradient_checkpointing = False
        self._checkpoint: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._checkpoint(self.resnets[1], x)
        return self.resnets[1](x)
