"""The PyTorch AutoencoderKL: encoder, decoder and the model with diffusers' public API."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from klvae.config import AutoencoderKLConfig, resolve_config
from klvae.errors import InputShapeError
from klvae.torch.attention import Attention, AttnProcessor, AttnProcessor2_0
from klvae.torch.blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from klvae.torch.fused import group_norm_act
from klvae.torch.norm import group_norm
from klvae.torch.loading import PretrainedMixin
from klvae.torch.outputs import AutoencoderKLOutput, DecoderOutput, DiagonalGaussianDistribution
from klvae.torch import precision, tiling


class _Checkpointed(nn.Module):
    """A module whose child blocks can run under gradient checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self._checkpoint: Callable[..., torch.Tensor] | None = None

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._checkpoint(block, x)
        return block(x)


class Encoder(_Checkpointed):
    """(B, in_channels, H, W) images -> (B, 2 * latent_channels, H / f, W / f) moments (mean and log-variance)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(chans[max(i - 1, 0)], c, config.layers_per_block, groups, config.act_fn,
                               add_downsample=i < len(chans) - 1)
            for i, c in enumerate(chans))
        self.mid_block = UNetMidBlock2D(chans[-1], groups, config.act_fn, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(chans[-1], groups)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = self._run(block, x)
        x = self._run(self.mid_block, x)
        return self.conv_out(group_norm_act(x, self.conv_norm_out, self.conv_act))


class Decoder(_Checkpointed):
    """(B, latent_channels, h, w) latents -> (B, out_channels, h * f, w * f) images."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        chans, groups = tuple(reversed(config.decoder_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, chans[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(chans[max(i - 1, 0)], c, config.layers_per_block + 1, groups, config.act_fn,
                             add_upsample=i < len(chans) - 1)
            for i, c in enumerate(chans))
        self.mid_block = UNetMidBlock2D(chans[0], groups, config.act_fn, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(chans[-1], groups)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self._run(self.mid_block, x)
        for block in self.up_blocks:
            x = self._run(block, x)
        return self.conv_out(group_norm_act(x, self.conv_norm_out, self.conv_act))


class AutoencoderKL(PretrainedMixin, nn.Module):
    """The KL-regularised autoencoder of latent diffusion, with diffusers' ``AutoencoderKL`` API and weights.

    Build it from config fields (``AutoencoderKL(block_out_channels=(128, 256, 512, 512), ...)``), a config
    (``AutoencoderKL(config=preset("sdxl"))``), or load one with :meth:`from_pretrained`. Images are
    (B, C, H, W) in [-1, 1]; latents are (B, latent_channels, H / f, W / f) with f = ``config.downsample_factor``.
    ``encode``/``decode`` never apply ``scaling_factor``; :mod:`klvae.latents` does.
    """

    _supports_gradient_checkpointing = True
    #: The config class this model takes (diffusers' ``_class_name`` is its ``class_name``).
    config_class: type[AutoencoderKLConfig] = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig | None = None, **config_fields: Any):
        super().__init__()
        self._config = resolve_config(config, cls=self.config_class, **config_fields)
        config = self._config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = (nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)
        self.use_slicing = False
        self.use_tiling = False
        self.tiling_mode = tiling.DEFAULT_MODE
        self.tiling_memory_limit: float | None = None  # exact/auto tiling: activation bytes to stay within
        self.tiling_spill: bool | str = False  # exact/auto tiling: may keep activations in files (True or a folder)
        # diffusers' tiling attributes: tiles of tile_sample_min_size pixels, overlapping by tile_overlap_factor.
        sample = config.sample_height_width[0]
        self.tile_sample_min_size = sample
        self.tile_latent_min_size = int(sample / config.downsample_factor)
        self.tile_overlap_factor = 0.25
        # The dtype encode/decode compute in; None: the weights' dtype, or float32 where the device only emulates
        # that half precision (see klvae.torch.precision). float16 results that overflow are recomputed in float32.
        self.compute_dtype: torch.dtype | None = None

    @property
    def config(self) -> AutoencoderKLConfig:
        return self._config

    # ------------------------------------------------------------------ conveniences pipelines use
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode (B, C, H, W) images in [-1, 1] to the posterior over latents."""
        x = self._check_input(x, self.config.in_channels, self.config.downsample_factor, "images")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        modules = [m for m in (self.encoder, self.quant_conv) if m is not None]
        return precision.compute(modules, self._compute_dtype_for(x), self._encode_any_size, x, "encode")

    def _encode_any_size(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and self.tiling_mode != "blend":  # exact/auto decide themselves whether to split
            return tiling.tiled_encode(self, x, mode=self.tiling_mode, memory_limit=self.tiling_memory_limit,
                                       spill=self.tiling_spill)
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return tiling.blend_tiled_encode_moments(self, x)
        return self._encode_moments(x)

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder then quant_conv: (B, C, H, W) -> (B, 2 * latent_channels, H / f, W / f)."""
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, z: torch.Tensor, return_dict: bool = True,
               generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        """Decode (B, latent_channels, h, w) latents to images. ``generator`` is accepted, as in diffusers, and
        unused: decoding is deterministic."""
        z = self._check_input(z, self.config.latent_channels, 1, "latents")
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            sample = self._decode(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        modules = [m for m in (self.post_quant_conv, self.decoder) if m is not None]
        return precision.compute(modules, self._compute_dtype_for(z), self._decode_any_size, z, "decode")

    def _decode_any_size(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and self.tiling_mode != "blend":
            return tiling.tiled_decode(self, z, mode=self.tiling_mode, memory_limit=self.tiling_memory_limit,
                                       spill=self.tiling_spill)
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return tiling.blend_tiled_decode(self, z)
        return self._decode_latents(z)

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv then decoder."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        """Encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode in overlapping tiles blended linearly (diffusers' algorithm), whatever ``use_tiling`` says."""
        z = self._check_input(z, self.config.latent_channels, 1, "latents")
        sample = tiling.blend_tiled_decode(self, z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode in overlapping tiles blended linearly (diffusers' algorithm), whatever ``use_tiling`` says."""
        x = self._check_input(x, self.config.in_channels, self.config.downsample_factor, "images")
        posterior = DiagonalGaussianDistribution(tiling.blend_tiled_encode_moments(self, x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        return self.compute_dtype or precision.fast_compute_dtype(x.dtype, x.device)

    def _check_input(self, x: torch.Tensor, channels: int, multiple: int, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputShapeError(f"{what} must have shape (batch, {channels}, height, width); got {tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise InputShapeError(
                f"{what} of shape {tuple(x.shape)}: height and width must be multiples of {multiple} (the model "
                f"downsamples by {multiple}); pad or crop to ({x.shape[2] // multiple * multiple}, "
                f"{x.shape[3] // multiple * multiple}) or the next multiple up")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        dtype = self.dtype
        return x if x.dtype == dtype else x.to(dtype)

    # ------------------------------------------------------------------ slicing and tiling switches
    def enable_slicing(self) -> None:
        """Encode/decode a batch one item at a time (same results, less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, mode: str = tiling.DEFAULT_MODE, *, tile_sample_min_size: int | None = None,
                      tile_overlap_factor: float | None = None, memory_limit: float | None = None,
                      spill: bool | str = False) -> None:
        """Encode/decode images larger than ``tile_sample_min_size`` pixels in tiles.

        ``mode="exact"`` (default) gives the untiled output with bounded memory; ``"blend"`` is diffusers'
        algorithm (diffusers' tiled output, which differs from untiled); ``"auto"`` tiles (exactly) only when the
        estimated memory exceeds ``memory_limit`` (default: the memory available) or on an out-of-memory error.
        ``memory_limit``: activation bytes the exact plan stays within. ``spill``: to stay within it, keep
        activations in temporary files (``True``: in the system's temporary folder; or a folder) rather than
        recompute them. See :mod:`klvae.torch.tiling`.
        """
        if mode not in tiling.MODES:
            raise ValueError(f"unknown tiling mode {mode!r}; choose one of {', '.join(tiling.MODES)}")
        if tile_sample_min_size is not None:
            if tile_sample_min_size < self.config.downsample_factor or tile_sample_min_size % self.config.downsample_factor:
                raise ValueError(f"tile_sample_min_size must be a positive multiple of "
                                 f"{self.config.downsample_factor}, got {tile_sample_min_size}")
            self.tile_sample_min_size = tile_sample_min_size
            self.tile_latent_min_size = tile_sample_min_size // self.config.downsample_factor
        if tile_overlap_factor is not None:
            if not 0.0 <= tile_overlap_factor < 1.0:
                raise ValueError(f"tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}")
            self.tile_overlap_factor = tile_overlap_factor
        if memory_limit is not None and not memory_limit > 0:
            raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
        if not isinstance(spill, (bool, str)):
            raise TypeError(f"spill must be True, False or a folder path, got {type(spill).__name__}")
        if isinstance(spill, str) and not os.path.isdir(spill):
            raise FileNotFoundError(f"spill folder {spill!r} does not exist")
        self.tiling_memory_limit = memory_limit
        self.tiling_spill = spill
        self.tiling_mode = mode
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # ------------------------------------------------------------------ attention processors
    def _attention_modules(self) -> dict[str, Attention]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Attention)}

    @property
    def attn_processors(self) -> dict[str, AttnProcessor2_0]:
        """``{"encoder.mid_block.attentions.0.processor": processor, ...}``, as in diffusers."""
        return {f"{name}.processor": m.processor for name, m in self._attention_modules().items()}

    def set_attn_processor(self, processor: AttnProcessor2_0 | dict[str, AttnProcessor2_0]) -> None:
        """Set one processor on every attention layer, or a dict keyed as :attr:`attn_processors` is."""
        modules = self._attention_modules()
        if isinstance(processor, dict):
            expected = {f"{name}.processor" for name in modules}
            if set(processor) != expected:
                raise ValueError(f"set_attn_processor got processors for {sorted(processor)}, expected exactly "
                                 f"{sorted(expected)}")
            for name, m in modules.items():
                m.set_processor(processor[f"{name}.processor"])
        else:
            for m in modules.values():
                m.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """The plain-math processor (fp32 softmax), as diffusers' ``set_default_attn_processor`` sets."""
        self.set_attn_processor(AttnProcessor())

    def fuse_qkv_projections(self) -> None:
        """Compute q, k, v with one matrix product per attention layer (inference; undo with unfuse)."""
        for m in self._attention_modules().values():
            m.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for m in self._attention_modules().values():
            m.unfuse_projections()

    # ------------------------------------------------------------------ gradient checkpointing
    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """Recompute block activations in the backward pass instead of storing them (same gradients)."""
        func = gradient_checkpointing_func or functools.partial(torch.utils.checkpoint.checkpoint,
                                                                use_reentrant=False)
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
                m._checkpoint = func

    def disable_gradient_checkpointing(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False
