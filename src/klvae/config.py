"""The one configuration shared by both backends, with presets and diffusers ``config.json`` in and out.

This module imports neither torch nor jax. Field names, meanings and defaults are those of diffusers'
``AutoencoderKL``, so a diffusers ``config.json`` reads here unchanged and what we write reads in diffusers.
:class:`AutoencoderKLFlux2Config` is FLUX.2's member of the family: the same fields plus a decoder width and the
BatchNorm that normalises its latents, with diffusers' ``AutoencoderKLFlux2`` fields and defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from klvae.errors import ConfigError

CONFIG_NAME = "config.json"
CLASS_NAME = "AutoencoderKL"
FLUX2_CLASS_NAME = "AutoencoderKLFlux2"
# The diffusers release whose AutoencoderKL config and weight layout we follow; written into config.json.
DIFFUSERS_VERSION = "0.42.1"

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACTIVATIONS = ("silu", "swish", "gelu", "mish", "relu")
# Clamp applied to the posterior's log-variance, as in diffusers and the original LDM code.
LOGVAR_CLAMP = (-30.0, 20.0)
# GroupNorm epsilon used by every norm of the VAE.
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderKLConfig(Mapping):
    """Architecture and latent-space constants of an AutoencoderKL.

    Readable by attribute (``config.scaling_factor``) and by key (``config["scaling_factor"]``), as
    diffusers' ``FrozenDict`` config is. Sequences are stored as tuples so the config is hashable (a valid
    ``jax.jit`` static argument).
    """

    #: diffusers' model class this config belongs to (``_class_name`` in config.json).
    class_name: ClassVar[str] = CLASS_NAME
    #: The fields diffusers' class has: what config.json holds and what the mapping protocol shows.
    json_fields: ClassVar[tuple[str, ...]] = ()

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    # Resnets per encoder block; decoder blocks have one more.
    layers_per_block: int = 1
    # Activation inside the resnets only; the encoder's and decoder's final activation is always SiLU.
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    # Training resolution; also the default tile size of "blend" tiling. An int or (height, width).
    sample_size: int | tuple[int, ...] = 32
    # Latent scaling used by diffusion pipelines; encode/decode never apply it (see klvae.latents).
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # A flag pipelines read: run this VAE in float32 even when the pipeline runs in float16.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            _freeze(self, name, _as_tuple(getattr(self, name), name))
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                _freeze(self, name, tuple(float(v) for v in _as_tuple(getattr(self, name), name)))
        if isinstance(self.sample_size, (list, tuple)):
            _freeze(self, "sample_size", _as_tuple(self.sample_size, "sample_size"))
        self._validate()
        self._validate_latent_factors()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _check_positive_int(name, getattr(self, name))
        if not self.block_out_channels:
            raise ConfigError("block_out_channels must name at least one block")
        for c in self.block_out_channels:
            _check_positive_int("block_out_channels", c)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) and "
                f"block_out_channels ({n}) must have the same length")
        for kind, allowed, name in ((self.down_block_types, DOWN_BLOCK_TYPES, "down_block_types"),
                                    (self.up_block_types, UP_BLOCK_TYPES, "up_block_types")):
            for t in kind:
                if t not in allowed:
                    raise ConfigError(f"{name}: unknown block type {t!r}; supported: {', '.join(allowed)}")
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(f"act_fn: unknown activation {self.act_fn!r}; supported: {', '.join(ACTIVATIONS)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"block_out_channels {self.block_out_channels}: {c} channels are not divisible by "
                    f"norm_num_groups={self.norm_num_groups}")
        sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        if not 1 <= len(sizes) <= 2:
            raise ConfigError(f"sample_size must be an int or (height, width), got {self.sample_size!r}")
        for s in sizes:
            _check_positive_int("sample_size", s)
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _validate_latent_factors(self) -> None:
        for name in ("scaling_factor", "shift_factor"):
            value = getattr(self, name)
            if value is None and name == "shift_factor":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.scaling_factor == 0:
            raise ConfigError("scaling_factor must not be zero")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ConfigError("latents_mean and latents_std must be given together")
        if self.latents_mean is not None:
            for name in ("latents_mean", "latents_std"):
                if len(getattr(self, name)) != self.latent_channels:
                    raise ConfigError(f"{name} has {len(getattr(self, name))} values, expected latent_channels="
                                      f"{self.latent_channels}")
            if any(s <= 0 for s in self.latents_std):
                raise ConfigError(f"latents_std must be positive, got {self.latents_std}")
        if not isinstance(self.force_upcast, bool):
            raise ConfigError(f"force_upcast must be true or false, got {self.force_upcast!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's block widths, listed from the highest resolution as ``block_out_channels`` is."""
        return self.block_out_channels

    @property
    def latent_patch_size(self) -> tuple[int, int] | None:
        """FLUX.2: the (height, width) patch its latent statistics are taken over; None for other models."""
        return None

    @property
    def sample_height_width(self) -> tuple[int, int]:
        """``sample_size`` as (height, width)."""
        s = self.sample_size
        if isinstance(s, tuple):
            return (s[0], s[-1])
        return (s, s)

    # ------------------------------------------------------------------ mapping protocol (diffusers' FrozenDict)
    def __getitem__(self, key: str) -> Any:
        if key not in self.json_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.json_fields)

    def __len__(self) -> int:
        return len(self.json_fields)

    def replace(self, **changes: Any) -> AutoencoderKLConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ diffusers config.json
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (tuples become lists), without diffusers' bookkeeping keys."""
        return {name: _jsonable(getattr(self, name)) for name in self.json_fields}

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The dict diffusers writes as ``config.json`` for this model class."""
        return {"_class_name": self.class_name, "_diffusers_version": DIFFUSERS_VERSION, **self.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> AutoencoderKLConfig:
        """Build from a diffusers-style dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are bookkeeping and
        skipped; other unknown keys are reported with a warning and skipped, as diffusers does. A ``_class_name``
        of another model is an error that names the class to load it with (:func:`config_from_dict` picks it).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        class_name = data.get("_class_name")
        if class_name is not None and class_name.removeprefix("Flax") != cls.class_name:
            raise ConfigError(f"{source}: _class_name is {class_name!r}, not an {cls.class_name} config"
                              + _load_with_hint(class_name))
        known = {k: v for k, v in data.items() if k in cls.json_fields}
        unknown = sorted(k for k in data if k not in cls.json_fields and not str(k).startswith("_"))
        if unknown:
            warnings.warn(f"{source}: ignoring keys that are not {cls.class_name} config fields: "
                          f"{', '.join(unknown)}", stacklevel=2)
        try:
            return cls(**known)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # a field of the wrong type (e.g. a string where a list belongs)
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> AutoencoderKLConfig:
        """Read a diffusers ``config.json``."""
        path = os.fspath(path)
        return cls.from_dict(_read_json(path), source=path)

    def to_json_string(self) -> str:
        return json.dumps(self.to_diffusers_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write a diffusers ``config.json`` atomically (a reader never sees a half-written file)."""
        from klvae.fileio import atomic_write_bytes

        atomic_write_bytes(os.fspath(path), self.to_json_string().encode("utf-8"))


AutoencoderKLConfig.json_fields = tuple(f.name for f in dataclasses.fields(AutoencoderKLConfig))
_LATENT_FACTOR_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderKLFlux2Config(AutoencoderKLConfig):
    """FLUX.2's VAE (diffusers' ``AutoencoderKLFlux2``): AutoencoderKL's architecture with 32 latent channels, an
    optional decoder width, and a BatchNorm (no affine) over the latents patchified ``patch_size``, whose running
    statistics are the latent normalisation FLUX.2's transformer sees. Defaults are diffusers' (the published
    architecture). There are no scalar latent factors: ``scaling_factor`` and friends are None, absent from
    config.json and from the mapping protocol; the statistics live in the weights (``bn.running_mean``/``_var``).
    """

    class_name: ClassVar[str] = FLUX2_CLASS_NAME

    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    #: The decoder's widths (from the highest resolution, as ``block_out_channels``); None: the encoder's.
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    sample_size: int | tuple[int, ...] = 1024
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, ...] = (2, 2)
    scaling_factor: float | None = None
    force_upcast: bool | None = None

    def __post_init__(self) -> None:
        if self.decoder_block_out_channels is not None:
            _freeze(self, "decoder_block_out_channels",
                    _as_tuple(self.decoder_block_out_channels, "decoder_block_out_channels"))
        _freeze(self, "patch_size", _as_tuple(self.patch_size, "patch_size"))
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        dec = self.decoder_block_out_channels
        if dec is not None:
            if len(dec) != len(self.block_out_channels):
                raise ConfigError(f"decoder_block_out_channels {dec} must have as many blocks as block_out_channels "
                                  f"{self.block_out_channels}")
            for c in dec:
                _check_positive_int("decoder_block_out_channels", c)
                if c % self.norm_num_groups:
                    raise ConfigError(f"decoder_block_out_channels {dec}: {c} channels are not divisible by "
                                      f"norm_num_groups={self.norm_num_groups}")
        if len(self.patch_size) != 2:
            raise ConfigError(f"patch_size must be (height, width), got {self.patch_size!r}")
        for p in self.patch_size:
            _check_positive_int("patch_size", p)
        for name in ("batch_norm_eps", "batch_norm_momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not self.batch_norm_eps > 0:
            raise ConfigError(f"batch_norm_eps must be positive, got {self.batch_norm_eps!r}")
        if not 0 <= self.batch_norm_momentum <= 1:
            raise ConfigError(f"batch_norm_momentum must be in [0, 1], got {self.batch_norm_momentum!r}")

    def _validate_latent_factors(self) -> None:
        given = [name for name in _LATENT_FACTOR_FIELDS if getattr(self, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: FLUX.2's VAE has no scalar latent factors (its latents are "
                              "normalised by the BatchNorm statistics in its weights)")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def latent_patch_size(self) -> tuple[int, int]:
        return (self.patch_size[0], self.patch_size[1])

    @property
    def batch_norm_channels(self) -> int:
        """Channels of the patchified latents the BatchNorm normalises: latent_channels x patch area."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]


AutoencoderKLFlux2Config.json_fields = tuple(f.name for f in dataclasses.fields(AutoencoderKLFlux2Config)
                                             if f.name not in _LATENT_FACTOR_FIELDS)
#: Config classes by diffusers' class name.
CONFIG_CLASSES: dict[str, type[AutoencoderKLConfig]] = {
    CLASS_NAME: AutoencoderKLConfig, FLUX2_CLASS_NAME: AutoencoderKLFlux2Config}
# What to load each class's folders and files with.
_LOADERS = {CLASS_NAME: "klvae.AutoencoderKL (klvae.flax.FlaxAutoencoderKL for Flax)",
            FLUX2_CLASS_NAME: "klvae.AutoencoderKLFlux2 (klvae.flax.FlaxAutoencoderKLFlux2 for Flax)"}


def _load_with_hint(class_name: str) -> str:
    loader = _LOADERS.get(str(class_name).removeprefix("Flax"))
    return f"; load it with {loader}" if loader else ""


def config_class_for(class_name: str | None, source: str = "config") -> type[AutoencoderKLConfig]:
    """The config class for a diffusers ``_class_name`` (None: AutoencoderKL); other models are an error."""
    if class_name is None:
        return AutoencoderKLConfig
    cls = CONFIG_CLASSES.get(str(class_name).removeprefix("Flax"))
    if cls is None:
        raise ConfigError(f"{source}: _class_name is {class_name!r}, not a model klvae knows "
                          f"({', '.join(CONFIG_CLASSES)})")
    return cls


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> AutoencoderKLConfig:
    """A config of the class its ``_class_name`` names (AutoencoderKL when absent)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    return config_class_for(data.get("_class_name"), source).from_dict(data, source=source)


def read_config_file(path: str | os.PathLike) -> AutoencoderKLConfig:
    """A ``config.json`` of either model class, as :func:`config_from_dict` reads it."""
    path = os.fspath(path)
    data = _read_json(path)
    class_name = data.get("_class_name") if isinstance(data, Mapping) else None
    return config_class_for(class_name, path).from_dict(data, source=path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _freeze(config: AutoencoderKLConfig, name: str, value: Any) -> None:
    object.__setattr__(config, name, value)


def _as_tuple(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    return tuple(value)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------- presets
_SD_ARCH = AutoencoderKLConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=512,
)
_SD3_ARCH = _SD_ARCH.replace(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)

#: Published configurations: the architecture and latent factors of each model family's VAE.
PRESETS: dict[str, AutoencoderKLConfig] = {
    "sd1": _SD_ARCH,                                            # SD 1.x (stable-diffusion-v1-5/vae)
    "sd-vae-ft-mse": _SD_ARCH.replace(sample_size=256),         # stabilityai/sd-vae-ft-mse
    "sd2": _SD_ARCH.replace(sample_size=768),                   # SD 2.x (stable-diffusion-2-1/vae)
    "sdxl": _SD_ARCH.replace(sample_size=1024, scaling_factor=0.13025),
    "sdxl-fp16-fix": _SD_ARCH.replace(sample_size=1024, scaling_factor=0.13025, force_upcast=False),
    "sd3": _SD3_ARCH.replace(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": _SD3_ARCH.replace(scaling_factor=0.3611, shift_factor=0.1159),
    # FLUX.2 [dev] and [klein] (black-forest-labs/FLUX.2-dev/vae): latents normalised by its BatchNorm statistics.
    "flux2": AutoencoderKLFlux2Config(),
    # A small model for tests and examples: two blocks (factor 2), 8 and 16 channels.
    "tiny": AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
}
PRESET_ALIASES = {"sd": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd21": "sd2", "sd2.1": "sd2", "sd35": "sd3",
                  "sd3.5": "sd3", "flux1": "flux", "flux.1": "flux", "flux.2": "flux2", "flux2-dev": "flux2",
                  "flux2-klein": "flux2"}


def preset(name: str) -> AutoencoderKLConfig:
    """The preset called ``name`` (case-insensitive; aliases such as ``sd15`` accepted)."""
    key = name.lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def resolve_config(config: AutoencoderKLConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                   *, cls: type[AutoencoderKLConfig] = AutoencoderKLConfig, strict: bool = True,
                   **overrides: Any) -> AutoencoderKLConfig:
    """Turn what a user may pass as a config into a config of class ``cls``.

    Accepts a config, a dict of fields, a preset name, a diffusers folder or a ``config.json`` path; keyword
    overrides replace fields. ``None`` means diffusers' defaults. A config of the other model class (a FLUX.2
    config for an AutoencoderKL, or the reverse) is a :class:`ConfigError` that names the class to use, unless
    ``strict`` is false (then ``cls`` only decides what a dict without ``_class_name`` or None means).
    """
    if config is None:
        base = cls()
    elif isinstance(config, AutoencoderKLConfig):
        base = config
    elif isinstance(config, Mapping):
        base = config_class_for(config.get("_class_name", cls.class_name)).from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            base = read_config_file(os.path.join(path, CONFIG_NAME))
        elif os.path.isfile(path):
            base = read_config_file(path)
        else:
            base = preset(path)
    else:
        raise ConfigError(f"cannot make a config from {type(config).__name__}")
    if strict and type(base) is not cls:
        raise ConfigError(f"this is an {base.class_name} config, not an {cls.class_name} one"
                          + _load_with_hint(base.class_name))
    return base.replace(**overrides) if overrides else base
