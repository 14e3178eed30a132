"""Building blocks of the Flax encoder and decoder (NHWC), mirroring klvae.torch.blocks class for class.

Submodules are built in ``setup()``; linen names list members ``resnets_0``, ``resnets_1``, ... and the single
resampler ``downsamplers_0``/``upsamplers_0``, which is what the weight conversion targets.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn

from klvae.flax.attention import FlaxAttentionBlock
from klvae.flax.layers import Dtype, Precision, activation, conv, group_norm


class FlaxResnetBlock2D(nn.Module):
    """``x + conv2(dropout(act(norm2(conv1(act(norm1(x)))))))``, with a 1x1 ``conv_shortcut`` when channels change."""

    in_channels: int
    out_channels: int
    groups: int
    act_fn: str = "silu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self) -> None:
        self.norm1 = group_norm(self, self.groups)
        self.conv1 = conv(self, self.out_channels, 3)
        self.norm2 = group_norm(self, self.groups)
        self.dropout_layer = nn.Dropout(self.dropout)
        self.conv2 = conv(self, self.out_channels, 3)
        self.conv_shortcut = conv(self, self.out_channels, 1) if self.in_channels != self.out_channels else None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        act = activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(self.dropout_layer(act(self.norm2(h)), deterministic=deterministic))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


def _numerics(block: nn.Module) -> dict:
    """The numerics fields every block carries (see :mod:`klvae.flax.layers`), to hand on to its children."""
    return dict(dtype=block.dtype, param_dtype=block.param_dtype, precision=block.precision)


class _FlaxResampler(nn.Module):
    """A 3x3 conv of ``channels`` around a change of resolution (the subclass's)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    stride: ClassVar[int] = 1
    padding: ClassVar[Any] = None

    def setup(self) -> None:
        self.conv = conv(self, self.channels, 3, stride=self.stride, padding=self.padding)


class FlaxDownsample2D(_FlaxResampler):
    """Halve H and W: pad one row and column at the bottom and right, then a stride-2 3x3 VALID conv.

    Not ``padding="SAME"``: on odd sizes SAME pads differently and the result differs from PyTorch.
    """

    stride: ClassVar[int] = 2
    padding: ClassVar[Any] = "VALID"

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class FlaxUpsample2D(_FlaxResampler):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv, computed as :func:`upsample_conv`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_initializing():      # the conv creates its parameters the plain way
            return self.conv(upsample_nearest_2x(x))
        params = self.conv.variables["params"]
        return upsample_conv(x, params["kernel"], params["bias"], dtype=self.dtype, precision=self.precision)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2 (no gather, unlike ``jax.image.resize``).

    ``jnp.repeat`` rather than a hand-written broadcast and reshape: it carries a batch sharding through under
    explicit-sharding meshes, where a bare reshape of the broadcast is refused.
    """
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype: Dtype = None,
                  precision: Precision = None) -> jax.Array:
    """``conv3x3(upsample_nearest_2x(x))`` (padding 1) without building the upsampled tensor, as in the torch
    backend (``klvae.torch.blocks.upsample_conv``): the four output phases (row parity a, column parity b) are 2x2
    convolutions of ``x`` whose taps are sums of the 3x3 taps (:func:`phase_kernels`), 16 instead of 36
    multiply-adds per output. ``kernel`` is (3, 3, C_in, C_out) (HWIO); computed in ``dtype`` as ``nn.Conv``
    would (default: promoted from the inputs)."""
    b, h, w, _ = x.shape
    c_out = kernel.shape[-1]
    dtype = dtype or jnp.result_type(x, kernel)
    y = jax.lax.conv_general_dilated(x.astype(dtype), phase_kernels(kernel).astype(dtype), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    y = y.reshape(b, h + 1, w + 1, 4, c_out)       # (B, H + 1, W + 1, phase, C_out), phase = 2a + b
    # Phase (a, b) of input pixel (i, j) sits at y[i + a, j + b]: output pixel (2i + a, 2j + b).
    out = jnp.stack([y[:, a:a + h, p:p + w, 2 * a + p] for a in (0, 1) for p in (0, 1)], axis=3)
    out = out.reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
    # Merging axes of a batch-sharded array needs its output sharding spelled out under explicit-sharding meshes:
    # the input's (batch axis as it was, the others whole).
    out = jnp.reshape(out, (b, 2 * h, 2 * w, c_out), out_sharding=jax.typeof(x).sharding)
    return out + bias.astype(dtype) if bias is not None else out


def phase_kernels(kernel: jax.Array) -> jax.Array:
    """(3, 3, C_in, C_out) -> (2, 2, C_in, 4 * C_out): the 2x2 kernels of the output phases (a, b), phase-major.

    Along one axis, output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows (i - 1, i, i)
    for a = 0 and (i, i, i + 1) for a = 1: taps (w0, w1 + w2) and (w0 + w1, w2); sums in float32 at least.
    """
    k = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))

    def fold(t: jax.Array, axis: int, a: int) -> jax.Array:
        t0, t1, t2 = (jnp.take(t, i, axis=axis) for i in range(3))
        return jnp.stack([t0, t1 + t2] if a == 0 else [t0 + t1, t2], axis=axis)

    phases = [fold(fold(k, 0, a), 1, p) for a in (0, 1) for p in (0, 1)]
    return jnp.concatenate(phases, axis=-1).astype(kernel.dtype)


class _FlaxResnetStack(nn.Module):
    """``num_layers`` resnets (the first changes the channels), then the subclass's resampler, if any, in a list
    named ``resampler_name`` (``downsamplers``/``upsamplers``: the weight conversion's names)."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    resampler_name: ClassVar[str]

    def build(self, resampler: type[_FlaxResampler] | None) -> None:
        self.resnets = [FlaxResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                                          self.groups, self.act_fn, **_numerics(self)) for i in range(self.num_layers)]
        setattr(self, self.resampler_name, [resampler(self.out_channels, **_numerics(self))] if resampler else None)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, deterministic)
        resamplers = getattr(self, self.resampler_name)
        return resamplers[0](x) if resamplers is not None else x


class FlaxDownEncoderBlock2D(_FlaxResnetStack):
    add_downsample: bool = True
    resampler_name: ClassVar[str] = "downsamplers"

    def setup(self) -> None:
        self.build(FlaxDownsample2D if self.add_downsample else None)


class FlaxUpDecoderBlock2D(_FlaxResnetStack):
    add_upsample: bool = True
    resampler_name: ClassVar[str] = "upsamplers"

    def setup(self) -> None:
        self.build(FlaxUpsample2D if self.add_upsample else None)


class FlaxUNetMidBlock2D(nn.Module):
    """resnet -> attention (optional) -> resnet, at the lowest resolution."""

    channels: int
    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self) -> None:
        numerics = _numerics(self)
        self.resnets = [FlaxResnetBlock2D(self.channels, self.channels, self.groups, self.act_fn, **numerics)
                        for _ in range(2)]
        self.attentions = [FlaxAttentionBlock(self.channels, self.groups, **numerics)] if self.add_attention else None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.resnets[0](x, deterministic)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, deterministic)
