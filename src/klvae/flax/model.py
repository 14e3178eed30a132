"""The Flax (linen) AutoencoderKL: encoder, decoder and the model with the seeds' Flax API.

Public inputs and outputs are NCHW, posteriors included; everything inside is NHWC, with one transpose each way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from klvae.config import AutoencoderKLConfig
from klvae.errors import ConfigError, InputShapeError
from klvae.flax.blocks import FlaxDownEncoderBlock2D, FlaxUNetMidBlock2D, FlaxUpDecoderBlock2D
from klvae.flax.layers import Dtype, Precision, conv, group_norm, to_nchw, to_nhwc
from klvae.flax.loading import FlaxPretrainedMixin
from klvae.flax.outputs import FlaxAutoencoderKLOutput, FlaxDecoderOutput, FlaxDiagonalGaussianDistribution
from klvae.flax import tiling
from klvae.flax.exact_tiling import is_traced, run_exact
from klvae.flax.sharded import check_mesh, run_sharded
from klvae.flax.tiling import blend_tiles
from klvae.tiling import decode_plan, encode_plan

_TUPLE_FIELDS = ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std",
                 "decoder_block_out_channels", "patch_size")


class _FlaxCoder(nn.Module):
    """The config and numerics the encoder and decoder are built from, and their shared output head."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def numerics(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def head(self, x: jax.Array) -> jax.Array:
        """GroupNorm, SiLU, conv_out."""
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class FlaxEncoder(_FlaxCoder):
    """(B, H, W, in_channels) images -> (B, H / f, W / f, 2 * latent_channels) moments (mean and log-variance)."""

    def setup(self) -> None:
        cfg = self.config
        chans, groups, numerics = cfg.block_out_channels, cfg.norm_num_groups, self.numerics()
        self.conv_in = conv(self, chans[0], 3)
        self.down_blocks = [
            FlaxDownEncoderBlock2D(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, cfg.act_fn,
                                   add_downsample=i < len(chans) - 1, **numerics)
            for i, c in enumerate(chans)]
        self.mid_block = FlaxUNetMidBlock2D(chans[-1], groups, cfg.act_fn, cfg.mid_block_add_attention, **numerics)
        self.conv_norm_out = group_norm(self, groups)
        self.conv_out = conv(self, 2 * cfg.latent_channels, 3)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x, deterministic)
        return self.head(self.mid_block(x, deterministic))


class FlaxDecoder(_FlaxCoder):
    """(B, h, w, latent_channels) latents -> (B, h * f, w * f, out_channels) images."""

    def setup(self) -> None:
        cfg = self.config
        chans, groups, numerics = tuple(reversed(cfg.decoder_channels)), cfg.norm_num_groups, self.numerics()
        self.conv_in = conv(self, chans[0], 3)
        self.mid_block = FlaxUNetMidBlock2D(chans[0], groups, cfg.act_fn, cfg.mid_block_add_attention, **numerics)
        self.up_blocks = [
            FlaxUpDecoderBlock2D(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, cfg.act_fn,
                                 add_upsample=i < len(chans) - 1, **numerics)
            for i, c in enumerate(chans)]
        self.conv_norm_out = group_norm(self, groups)
        self.conv_out = conv(self, cfg.out_channels, 3)

    def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x, deterministic)
        for block in self.up_blocks:
            x = block(x, deterministic)
        return self.head(x)


def config_fields_module(config_class: type[AutoencoderKLConfig], base: type[nn.Module]) -> type[nn.Module]:
    """A linen module class, subclass of ``base``, whose fields are ``config_class``'s (same names, annotations and
    defaults): the Flax models declare the shared config's fields through this, never by hand."""
    fields = dataclasses.fields(config_class)
    namespace = {"__module__": __name__, "__annotations__": {f.name: f.type for f in fields},
                 **{f.name: f.default for f in fields}}
    return type(f"{config_class.__name__}Fields", (base,), namespace)


class FlaxAutoencoderKL(FlaxPretrainedMixin, config_fields_module(AutoencoderKLConfig, nn.Module)):
    """The KL-regularised autoencoder of latent diffusion as a Flax linen module, with the PyTorch weights.

    Fields are the shared config's (:class:`~klvae.config.AutoencoderKLConfig`'s, declared from it) plus the
    numerics: ``dtype``
    (compute), ``param_dtype`` (parameter storage) and ``precision`` (convs and matmuls; ``"highest"`` for true
    float32 on GPU/TPU). Build from fields, with :meth:`from_config`, or load with :meth:`from_pretrained`, which
    returns ``(model, params)``. Images are (B, C, H, W) in [-1, 1]; latents (B, latent_channels, H / f, W / f).
    ``encode``/``decode`` never apply ``scaling_factor``; :mod:`klvae.latents` does.

    Slicing (``use_slicing``: one batch item at a time, a ``lax.map``) and tiling (``use_tiling`` with
    ``tiling_mode``, ``tile_sample_min_size``, ``tile_overlap_factor``) are fields too; a linen module is
    immutable, so :meth:`with_slicing` and :meth:`with_tiling` return a configured copy (same params).
    """

    # numerics
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    # slicing and tiling
    use_slicing: bool = False
    use_tiling: bool = False
    tiling_mode: str = "blend"
    tile_sample_min_size: int | None = None  # None: the config's sample_size
    tile_overlap_factor: float = 0.25
    tiling_memory_limit: float | None = None  # exact/auto: activation bytes to stay within (None: from free memory)
    tiling_mesh: Any = None  # sharded: the jax.sharding.Mesh whose axis ``tiling_axis`` splits the rows
    tiling_axis: str | None = None  # sharded: None means the mesh's only axis

    #: The config class whose fields this module's mirror (not a linen field: no annotation).
    config_class = AutoencoderKLConfig

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:  # lists would make the module unhashable
            value = getattr(self, name, None)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        config = self.config  # validates the architecture fields
        _check_tiling(self.tiling_mode, self.tile_sample_min_size, self.tile_overlap_factor,
                      self.tiling_memory_limit, config.downsample_factor)
        if self.use_tiling and self.tiling_mode == "sharded":
            check_mesh(self.tiling_mesh, self.tiling_axis)
        super().__post_init__()

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> AutoencoderKLConfig:
        """The shared config these fields describe."""
        cls = self.config_class
        return _config_from_items(cls, tuple((name, getattr(self, name)) for name in _config_fields(cls)))

    @classmethod
    def from_config(cls, config: AutoencoderKLConfig | dict[str, Any], **fields: Any) -> FlaxAutoencoderKL:
        """A module for ``config``; ``fields`` sets numerics (``dtype=jnp.bfloat16``) or overrides config fields."""
        if not isinstance(config, AutoencoderKLConfig):
            config = cls.config_class.from_dict(config)
        if type(config) is not cls.config_class:
            raise ConfigError(f"this is an {config.class_name} config; load it with "
                              f"klvae.flax.Flax{config.class_name}, not {cls.__name__}")
        return cls(**{name: getattr(config, name) for name in _config_fields(cls.config_class)}, **fields)

    def with_slicing(self, enabled: bool = True) -> FlaxAutoencoderKL:
        """A copy that encodes/decodes a batch one item at a time (same results, less peak memory)."""
        return self.clone(use_slicing=enabled)

    def with_tiling(self, mode: str = "blend", *, tile_sample_min_size: int | None = None,
                    tile_overlap_factor: float | None = None, memory_limit: float | None = None,
                    mesh: Any = None, axis: str | None = None, enabled: bool = True) -> FlaxAutoencoderKL:
        """A copy that encodes/decodes images larger than the tile size in tiles.

        ``"blend"`` (the default here) is diffusers' algorithm (diffusers' and the torch backend's tiled output).
        ``"exact"`` gives the untiled output with memory bounded by a plan, eagerly and under ``jax.jit``;
        ``"auto"`` runs untiled when the estimated memory fits ``memory_limit`` (default: the memory available),
        otherwise exactly tiled. ``"sharded"`` gives the untiled output split into row bands over the axis
        ``axis`` of the jax Mesh ``mesh`` (each device holds ~1/N of the activations; any size). See
        :mod:`klvae.flax.tiling` and :mod:`klvae.flax.sharded`.
        """
        changes: dict[str, Any] = dict(use_tiling=enabled, tiling_mode=mode)
        if mesh is not None:
            changes["tiling_mesh"] = mesh
        if axis is not None:
            changes["tiling_axis"] = axis
        if tile_sample_min_size is not None:
            changes["tile_sample_min_size"] = tile_sample_min_size
        if tile_overlap_factor is not None:
            changes["tile_overlap_factor"] = tile_overlap_factor
        if memory_limit is not None:
            changes["tiling_memory_limit"] = memory_limit
        return self.clone(**changes)

    # ------------------------------------------------------------------ modules
    def setup(self) -> None:
        cfg = self.config
        numerics = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.encoder = FlaxEncoder(cfg, **numerics)
        self.decoder = FlaxDecoder(cfg, **numerics)
        self.quant_conv = conv(self, 2 * cfg.latent_channels, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(self, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None

    def init_weights(self, rng: jax.Array, eval_only: bool = False) -> Any:
        """Random ``params`` (the "params" collection), or with ``eval_only`` their shapes and dtypes only
        (``jax.eval_shape``: nothing is computed or allocated). Traces on the smallest valid input."""
        f = self.config.downsample_factor
        plain = self.clone(use_slicing=False, use_tiling=False)
        params_rng, dropout_rng, gaussian_rng = jax.random.split(rng, 3)
        rngs = {"params": params_rng, "dropout": dropout_rng, "gaussian": gaussian_rng}
        shape = (1, self.in_channels, f, f)
        if eval_only:
            return jax.eval_shape(_init_params(plain), rngs, jax.ShapeDtypeStruct(shape, jnp.float32))
        return _jitted_init(plain)(rngs, jnp.zeros(shape, jnp.float32))

    # ------------------------------------------------------------------ public API (NCHW)
    def encode(self, sample: jax.Array, deterministic: bool = True,
               return_dict: bool = True) -> FlaxAutoencoderKLOutput | tuple:
        """Encode (B, C, H, W) images in [-1, 1] to the posterior over latents (NCHW)."""
        cfg = self.config
        x = _check_input(sample, cfg.in_channels, cfg.downsample_factor, "images")
        moments = self._sliced(FlaxAutoencoderKL._encode_nhwc, to_nhwc(x), deterministic)
        posterior = FlaxDiagonalGaussianDistribution(to_nchw(moments))
        return FlaxAutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, latents: jax.Array, deterministic: bool = True,
               return_dict: bool = True) -> FlaxDecoderOutput | tuple:
        """Decode (B, latent_channels, h, w) latents to (B, out_channels, h * f, w * f) images."""
        z = _check_input(latents, self.config.latent_channels, 1, "latents")
        sample = to_nchw(self._sliced(FlaxAutoencoderKL._decode_nhwc, to_nhwc(z), deterministic))
        return FlaxDecoderOutput(sample=sample) if return_dict else (sample,)

    def __call__(self, sample: jax.Array, sample_posterior: bool = False, deterministic: bool = True,
                 return_dict: bool = True) -> FlaxDecoderOutput | tuple:
        """Encode, take the posterior's mode (or a sample drawn from the ``"gaussian"`` rng stream), decode."""
        posterior = self.encode(sample, deterministic=deterministic).latent_dist
        z = posterior.sample(self.make_rng("gaussian")) if sample_posterior else posterior.mode()
        return self.decode(z, deterministic=deterministic, return_dict=return_dict)

    def tiled_encode(self, sample: jax.Array, deterministic: bool = True,
                     return_dict: bool = True) -> FlaxAutoencoderKLOutput | tuple:
        """Encode in overlapping blended tiles (diffusers' algorithm), whatever ``use_tiling`` says."""
        cfg = self.config
        x = to_nhwc(_check_input(sample, cfg.in_channels, cfg.downsample_factor, "images"))
        moments = self._blend_tiles(FlaxAutoencoderKL._encode_moments, x, self._encode_plan(), deterministic)
        posterior = FlaxDiagonalGaussianDistribution(to_nchw(moments))
        return FlaxAutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, latents: jax.Array, deterministic: bool = True,
                     return_dict: bool = True) -> FlaxDecoderOutput | tuple:
        """Decode in overlapping blended tiles (diffusers' algorithm), whatever ``use_tiling`` says."""
        z = to_nhwc(_check_input(latents, self.config.latent_channels, 1, "latents"))
        sample = to_nchw(self._blend_tiles(FlaxAutoencoderKL._decode_latents, z, self._decode_plan(), deterministic))
        return FlaxDecoderOutput(sample=sample) if return_dict else (sample,)

    # ------------------------------------------------------------------ NHWC internals
    def _encode_moments(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """Encoder then quant_conv: (B, H, W, C) -> (B, H / f, W / f, 2 * latent_channels)."""
        moments = self.encoder(x, deterministic)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_latents(self, z: jax.Array, deterministic: bool) -> jax.Array:
        """post_quant_conv then decoder."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, deterministic)

    def _encode_nhwc(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return self._any_size("encode", x, deterministic)

    def _decode_nhwc(self, z: jax.Array, deterministic: bool) -> jax.Array:
        return self._any_size("decode", z, deterministic)

    def _any_size(self, kind: str, x: jax.Array, deterministic: bool) -> jax.Array:
        """Encode or decode (``kind``) whole, in exact/auto tiles, or in blended tiles when larger than one."""
        encode = kind == "encode"
        method = FlaxAutoencoderKL._encode_moments if encode else FlaxAutoencoderKL._decode_latents
        if self.use_tiling and self.tiling_mode == "sharded" and not self.is_initializing():
            return run_sharded(self, self.variables["params"], kind, x, self.tiling_mesh, self.tiling_axis)
        if self.use_tiling and self.tiling_mode != "blend":
            return self._planned(method, kind, x, deterministic)
        if self.use_tiling and max(x.shape[1:3]) > self._tile_sizes()[0 if encode else 1]:
            plan = self._encode_plan() if encode else self._decode_plan()
            return self._blend_tiles(method, x, plan, deterministic)
        return method(self, x, deterministic)

    def _sliced(self, method: Any, x: jax.Array, deterministic: bool) -> jax.Array:
        """``method(self, x)``, or with slicing one batch item at a time in a ``lax.map`` (a sequential loop)."""
        if not self.use_slicing or x.shape[0] == 1 or self.is_initializing():
            return method(self, x, deterministic)
        if self.use_tiling and self.tiling_mode in ("exact", "auto") and not is_traced(x, self.variables):
            # eager exact tiling: a Python loop (it dispatches operation by operation)
            return jnp.concatenate([method(self, x[i:i + 1], deterministic) for i in range(x.shape[0])])
        run = self._pure(method, deterministic)
        return jax.lax.map(lambda item: run(item[None])[0], x)

    def _planned(self, method: Any, kind: str, x: jax.Array, deterministic: bool) -> jax.Array:
        """Exact or auto tiling: ``method`` untiled where the plan (or, for auto, memory) allows."""
        if self.is_initializing():
            return method(self, x, deterministic)
        return tiling.run_planned(self, x, kind, untiled=lambda: self._untiled(method, x, deterministic),
                                  run_exact=lambda plan: run_exact(self, self.variables["params"], plan, x))

    def _untiled(self, method: Any, x: jax.Array, deterministic: bool) -> jax.Array:
        """``method`` on the whole input: inline when traced, else as one compiled program (exact and auto
        modes run outside jit, where op-by-op dispatch would be slow)."""
        if isinstance(x, jax.core.Tracer):
            return method(self, x, deterministic)
        module, variables = self.unbind()
        return _jitted_method(module, method, deterministic)(variables, x)

    def _blend_tiles(self, method: Any, x: jax.Array, plan: Any, deterministic: bool) -> jax.Array:
        if self.is_initializing():  # no variables to close over yet: one call per tile
            return blend_tiles(x, plan, lambda t: method(self, t, deterministic), loop=False)
        return blend_tiles(x, plan, self._pure(method, deterministic))

    def _pure(self, method: Any, deterministic: bool) -> Any:
        """``method`` as a pure function of its input (closing over this module's variables), for ``lax.map``:
        linen submodules cannot be called inside a jax transform directly."""
        module, variables = self.unbind()
        return lambda x: module.apply(variables, x, deterministic, method=method)

    def _tile_sizes(self) -> tuple[int, int]:
        """(tile in pixels, tile in latents)."""
        tile = self.tile_sample_min_size or self.config.sample_height_width[0]
        return tile, tile // self.config.downsample_factor

    def _encode_plan(self):
        return encode_plan(*self._tile_sizes(), self.tile_overlap_factor)

    def _decode_plan(self):
        return decode_plan(*self._tile_sizes(), self.tile_overlap_factor)


def _init_params(module: FlaxAutoencoderKL) -> Any:
    return lambda rngs, sample: module.init(rngs, sample)["params"]


@functools.lru_cache(maxsize=16)
def _jitted_init(module: FlaxAutoencoderKL) -> Any:
    """A jitted init per module (compiled once, reused by later init_weights calls). One compile beats op-by-op
    dispatch by far; on CPU, XLA's LLVM optimisation of the random-number code dominates that compile (about 4x)
    and buys nothing for code that runs once, so it is turned off there."""
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(_init_params(module), compiler_options=options)


@functools.lru_cache(maxsize=32)
def _jitted_method(module: FlaxAutoencoderKL, method: Any, deterministic: bool) -> Any:
    return jax.jit(lambda variables, x: module.apply(variables, x, deterministic, method=method))


@functools.lru_cache(maxsize=128)
def _config_from_items(cls: type[AutoencoderKLConfig], items: tuple[tuple[str, Any], ...]) -> AutoencoderKLConfig:
    return cls(**dict(items))


def _config_fields(cls: type[AutoencoderKLConfig]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_tiling(mode: str, tile: int | None, overlap: float, memory_limit: float | None, factor: int) -> None:
    if mode not in tiling.MODES:
        raise ConfigError(f"tiling_mode: unknown tiling mode {mode!r}; choose one of {', '.join(tiling.MODES)}")
    if memory_limit is not None and not memory_limit > 0:
        raise ConfigError(f"tiling_memory_limit must be a positive number of bytes, got {memory_limit!r}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < factor or tile % factor):
        raise ConfigError(f"tile_sample_min_size must be a positive multiple of {factor}, got {tile!r}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"tile_overlap_factor must be in [0, 1), got {overlap!r}")


def _check_input(x: Any, channels: int, multiple: int, what: str) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{what} must be an array, got {type(x).__name__}")
    if len(x.shape) != 4 or x.shape[1] != channels:
        raise InputShapeError(f"{what} must have shape (batch, {channels}, height, width) (NCHW); got "
                              f"{tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise InputShapeError(
            f"{what} of shape {tuple(x.shape)}: height and width must be multiples of {multiple} (the model "
            f"downsamples by {multiple}); pad or crop to ({x.shape[2] // multiple * multiple}, "
            f"{x.shape[3] // multiple * multiple}) or the next multiple up")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what} must be a floating-point array, got {x.dtype}")
    return jnp.asarray(x)
