"""Building blocks of the encoder and decoder, named as diffusers names them (the state_dict keys follow)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from klvae.torch.attention import Attention
from klvae.torch.fused import group_norm_act
from klvae.torch.norm import group_norm

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU,
}
# Largest tensor F.interpolate indexes safely (it uses 32-bit indices on some paths).
_INT32_LIMIT = 2**31 - 1


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


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
        h = self.conv1(group_norm_act(x, self.norm1, self.nonlinearity))
        # One step per statement: rebinding ``h`` frees each intermediate before the next one is allocated
        # (a nested call would keep conv1's output alive until conv2 returns: one more full-size tensor at peak).
        h = group_norm_act(h, self.norm2, self.nonlinearity)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            # In training, a contiguous input keeps DDP's gradient strides consistent (diffusers does the same).
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return h.add_(x)  # in place: conv2's output is not saved for backward, and no new full-size tensor


class Downsample2D(nn.Module):
    """Halve H and W: pad one row and column at the bottom and right, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv (computed as :func:`upsample_conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        return upsample_conv(x, w, self.conv.bias, padding=1, kernels=_cached_phase_kernels(w))


# weight -> ((version, data pointer, dtype, device), its phase kernels); entries go with their weight tensor.
_PHASE_CACHE = WeakIdKeyDictionary()


def _cached_phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """:func:`_phase_kernels` of ``weight``, kept while that tensor's data is unchanged (its version counter, storage,
    dtype and device) and no gradient has to flow through them: building them is a pass over the weights."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
        return _phase_kernels(weight)
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    hit = _PHASE_CACHE.get(weight)
    if hit is None or hit[0] != key:
        hit = _PHASE_CACHE[weight] = (key, _phase_kernels(weight))
    return hit[1]


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                  kernels: torch.Tensor | None = None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` without building the upsampled tensor.

    Each output pixel (2i + a, 2j + b) sees a 3x3 window of the upsampled image that covers only 2x2 input
    pixels, so the four output phases (a, b) are 2x2 convolutions of ``x`` whose taps are sums of the 3x3 taps
    (:func:`_phase_kernels`): 16 instead of 36 multiply-adds per output, the same result up to summation order.
    ``padding`` (0 or 1) is the zero border of ``x``: with 1 the output is (2H, 2W), as ``Upsample2D``'s conv
    with padding 1 gives; with 0 ``x`` carries its own one-pixel border and the output is (2H - 4, 2W - 4).
    """
    b, _, h, w = x.shape
    c_out = weight.shape[0]
    oh, ow = h + 2 * padding - 2, w + 2 * padding - 2       # output size / 2
    if kernels is None:
        kernels = _phase_kernels(weight)                      # (4 * c_out, c_in, 2, 2), phase-major
    biases = bias.repeat(4) if bias is not None else None
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # out[n, c, i, a, j, b] is output pixel (2i + a, 2j + b); a channels-last input gets a channels-last output.
    if channels_last:
        out = x.new_empty(b, oh, 2, ow, 2, c_out).permute(0, 5, 1, 2, 3, 4)
    else:
        out = x.new_empty(b, c_out, oh, 2, ow, 2)
    # Output channels in slices small enough for 32-bit indexing inside the convolution.
    per_channel = b * 4 * (oh + 1) * (ow + 1)
    if per_channel > _INT32_LIMIT:
        raise ValueError(f"cannot upsample a tensor of shape {tuple(x.shape)}: one channel of the output alone "
                         "exceeds 2**31 elements; decode with slicing or tiling")
    step = max(1, min(c_out, _INT32_LIMIT // per_channel))
    for c0 in range(0, c_out, step):
        c1 = min(c_out, c0 + step)
        phase_rows = torch.cat([torch.arange(c0, c1) + k * c_out for k in range(4)]).to(weight.device)
        y = F.conv2d(x, kernels[phase_rows] if step < c_out else kernels,
                     biases[phase_rows] if biases is not None and step < c_out else biases, padding=padding)
        n = c1 - c0
        for k, (pa, pb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            out[:, c0:c1, :, pa, :, pb] = y[:, k * n:(k + 1) * n, pa:pa + oh, pb:pb + ow]
    return out.reshape(b, c_out, 2 * oh, 2 * ow) if not channels_last else \
        out.permute(0, 2, 3, 4, 5, 1).reshape(b, 2 * oh, 2 * ow, c_out).permute(0, 3, 1, 2)


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The 2x2 kernels of the four output phases of a 3x3 conv after nearest 2x upsampling.

    Along one axis, output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: taps (w0, w1 + w2) on rows (i - 1, i) and
    (w0 + w1, w2) on rows (i, i + 1). A 2x2 conv over ``x`` padded by one then puts phase a of row i at i + a.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))  # half precision: sums in float32
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2), torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
    phases = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1) if pb == 0 else
              torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1) for r in rows for pb in (0, 1)]
    return torch.cat(phases).to(weight.dtype)


class _ResnetStack(nn.Module):
    """``num_layers`` resnets (the first changes the channels), then the resampler, if any, in a list named
    ``resampler_name`` (diffusers' ``downsamplers``/``upsamplers``: the state_dict keys)."""

    resampler_name: str

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 resampler: Callable[[int], nn.Module] | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers))
        setattr(self, self.resampler_name, nn.ModuleList([resampler(out_channels)]) if resampler else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        resamplers = getattr(self, self.resampler_name)
        return resamplers[0](x) if resamplers is not None else x


class DownEncoderBlock2D(_ResnetStack):
    resampler_name = "downsamplers"

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__(in_channels, out_channels, num_layers, groups, act_fn, Downsample2D if add_downsample else None)


class UpDecoderBlock2D(_ResnetStack):
    resampler_name = "upsamplers"

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__(in_channels, out_channels, num_layers, groups, act_fn, Upsample2D if add_upsample else None)


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
