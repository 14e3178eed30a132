"""The one configuration shared by both backends, with presets and diffusers ``config.json`` in and out.

This module imports neither torch nor jax. Field names, meanings and defaults are those of diffusers'
``AutoencoderKL``, so a diffusers ``config.json`` reads here unchanged and what we write reads in diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from klvae.errors import ConfigError

CONFIG_NAME = "config.json"
CLASS_NAME = "AutoencoderKL"
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
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def sample_height_width(self) -> tuple[int, int]:
        """``sample_size`` as (height, width)."""
        s = self.sample_size
        if isinstance(s, tuple):
            return (s[0], s[-1])
        return (s, s)

    # ------------------------------------------------------------------ mapping protocol (diffusers' FrozenDict)
    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)

    def replace(self, **changes: Any) -> AutoencoderKLConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ diffusers config.json
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (tuples become lists), without diffusers' bookkeeping keys."""
        return {name: _jsonable(getattr(self, name)) for name in _FIELD_NAMES}

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The dict diffusers writes as ``config.json`` for an AutoencoderKL."""
        return {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **self.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> AutoencoderKLConfig:
        """Build from a diffusers-style dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are bookkeeping and
        skipped; other unknown keys are reported with a warning and skipped, as diffusers does. A ``_class_name``
        other than AutoencoderKL is an error: the folder holds some other model.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        class_name = data.get("_class_name")
        if class_name is not None and class_name not in (CLASS_NAME, "FlaxAutoencoderKL"):
            raise ConfigError(f"{source}: _class_name is {class_name!r}, not an {CLASS_NAME} config")
        known = {k: v for k, v in data.items() if k in _FIELD_NAMES}
        unknown = sorted(k for k in data if k not in _FIELD_NAMES and not str(k).startswith("_"))
        if unknown:
            warnings.warn(f"{source}: ignoring keys that are not AutoencoderKL config fields: {', '.join(unknown)}",
                          stacklevel=2)
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
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    def to_json_string(self) -> str:
        return json.dumps(self.to_diffusers_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write a diffusers ``config.json`` atomically (a reader never sees a half-written file)."""
        from klvae.fileio import atomic_write_bytes

        atomic_write_bytes(os.fspath(path), self.to_json_string().encode("utf-8"))


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AutoencoderKLConfig))


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
    # A small model for tests and examples: two blocks (factor 2), 8 and 16 channels.
    "tiny": AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
}
PRESET_ALIASES = {"sd": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd21": "sd2", "sd2.1": "sd2", "sd35": "sd3",
                  "sd3.5": "sd3", "flux1": "flux", "flux.1": "flux"}


def preset(name: str) -> AutoencoderKLConfig:
    """The preset called ``name`` (case-insensitive; aliases such as ``sd15`` accepted)."""
    key = name.lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def resolve_config(config: AutoencoderKLConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                   **overrides: Any) -> AutoencoderKLConfig:
    """Turn what a user may pass as a config into an :class:`AutoencoderKLConfig`.

    Accepts a config, a dict of fields, a preset name, a diffusers folder or a ``config.json`` path; keyword
    overrides replace fields. ``None`` means diffusers' defaults.
    """
    if config is None:
        base = AutoencoderKLConfig()
    elif isinstance(config, AutoencoderKLConfig):
        base = config
    elif isinstance(config, Mapping):
        base = AutoencoderKLConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            base = AutoencoderKLConfig.from_json_file(os.path.join(path, CONFIG_NAME))
        elif os.path.isfile(path):
            base = AutoencoderKLConfig.from_json_file(path)
        else:
            base = preset(path)
    else:
        raise ConfigError(f"cannot make a config from {type(config).__name__}")
    return base.replace(**overrides) if overrides else base
