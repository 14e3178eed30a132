"""Building blocks of the Flax encoder and decoder (NHWC), mirroring klvae.torch.blocks class for class.

Submodules are built in ``setup()``; linen names list members ``resnets_0``, ``resnets_1``, ... and the single
resampler ``downsamplers_0``/``upsamplers_0``, which is what the weight conversion targets.
"""

from __future__ import annotations

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


class FlaxDownsample2D(nn.Module):
    """Halve H and W: pad one row and column at the bottom and right, then a stride-2 3x3 VALID conv.

    Not ``padding="SAME"``: on odd sizes SAME pads differently and the result differs from PyTorch.
    """

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self) -> None:
        self.conv = conv(self, self.channels, 3, stride=2, padding="VALID")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class FlaxUpsample2D(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self) -> None:
        self.conv = conv(self, self.channels, 3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2 (no gather, unlike ``jax.image.resize``).

    ``jnp.repeat`` rather than a hand-written broadcast and reshape: it carries a batch sharding through under
    explicit-sharding meshes, where a bare reshape of the broadcast is refused.
    """
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class _FlaxResnetStack(nn.Module):
    """``num_layers`` resnets (the first changes the channels), then the subclass's resampler, if any."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def numerics(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def make_resnets(self) -> list[FlaxResnetBlock2D]:
        return [FlaxResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels, self.groups,
                                  self.act_fn, **self.numerics()) for i in range(self.num_layers)]

    def run(self, x: jax.Array, resamplers: list | None, deterministic: bool) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, deterministic)
        return resamplers[0](x) if resamplers is not None else x


class FlaxDownEncoderBlock2D(_FlaxResnetStack):
    add_downsample: bool = True

    def setup(self) -> None:
        self.resnets = self.make_resnets()
        self.downsamplers = [FlaxDownsample2D(self.out_channels, **self.numerics())] if self.add_downsample else None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.run(x, self.downsamplers, deterministic)


class FlaxUpDecoderBlock2D(_FlaxResnetStack):
    add_upsample: bool = True

    def setup(self) -> None:
        self.resnets = self.make_resnets()
        self.upsamplers = [FlaxUpsample2D(self.out_channels, **self.numerics())] if self.add_upsample else None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.run(x, self.upsamplers, deterministic)


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
        numerics = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.resnets = [FlaxResnetBlock2D(self.channels, self.channels, self.groups, self.act_fn, **numerics)
                        for _ in range(2)]
        self.attentions = [FlaxAttentionBlock(self.channels, self.groups, **numerics)] if self.add_attention else None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.resnets[0](x, deterministic)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, deterministic)
