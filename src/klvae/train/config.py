"""The training configuration: nested frozen dataclasses read from a TOML file (no torch, no jax).

A TOML file has one table per section::

    [model]   preset = "sd1"  | pretrained = "path/to/diffusers/folder"  | config = {block_out_channels = [...]}
    [data]    train_dir = "images/"  crop_size = 256  batch_size = 4
    [optim]   lr = 1e-4  max_steps = 10000  warmup_steps = 500  schedule = "cosine"
    [loss]    l1_weight = 1.0  perceptual_weight = 1.0  kl_weight = 1e-6  disc_start = 50001
    [train]   output_dir = "runs/my-vae"  ema_decay = 0.999  checkpoint_every = 500

Relative paths in the file are resolved against the file's folder. Unknown keys are errors (a typo must not be
silently ignored). A top-level ``base = "other.toml"`` (relative to the file) starts from that file's settings:
sections merge key by key, except ``[model]``, which replaces the base's whole when present (a model is one
choice: preset, pretrained folder or config). So a fine-tuning stage names only what it changes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from klvae.errors import ConfigError

RECON_LOSSES = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Which autoencoder to train: a preset, a pretrained folder/file (fine-tuning), and field overrides."""

    preset: str | None = None
    pretrained: str | None = None      # diffusers folder or single file, loaded with from_pretrained/from_single_file
    config: dict[str, Any] = dataclasses.field(default_factory=dict)   # AutoencoderKLConfig field overrides
    train_decoder_only: bool = False   # freeze encoder + quant_conv (decoder fine-tuning, as sd-vae-ft-mse)
    gradient_checkpointing: bool = False
    # Fresh models only: start the posterior's log-variance at this value (bias of its output channels) instead
    # of about 0. At 0 the sampling noise (std 1) swamps a new latent channel, and with a small KL weight the
    # encoder may never use it (a "dead" channel: posterior = prior); -6 starts the noise at std 0.05.
    posterior_logvar_init: float | None = None
    # FLUX.2's VAE: fold each step's posterior means into its latent BatchNorm statistics (as its training did).
    # Off by default: fine-tuning keeps the statistics the transformer was trained with.
    update_latent_statistics: bool = False


def posterior_logvar_bias(config) -> tuple[str, slice]:
    """The canonical key of the bias that offsets the posterior's log-variance, and its log-variance channels."""
    key = "quant_conv.bias" if config.use_quant_conv else "encoder.conv_out.bias"
    return key, slice(config.latent_channels, 2 * config.latent_channels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    train_dir: str = ""
    val_dir: str | None = None
    # One size, or several (``[64, 256]``): micro-batch ``i`` of a step uses ``crop_size[i % n]`` with the batch
    # scaled to the largest size's pixel count (``batch_size`` is at the largest) and its loss weighted to match,
    # so set ``[optim] grad_accum`` to ``n`` for every step to see each size once.
    crop_size: int | tuple[int, ...] = 256
    batch_size: int = 4                # per process
    random_flip: bool = True
    min_scale: float = 1.0             # random down-scaling of the image before cropping, in [min_scale, 1]
    channel_shuffle: bool = False      # randomly permute RGB (colour augmentation; with L1 alone, see docs/training.md)
    color_jitter: float = 0.0          # per-channel gain in [1 - j, 1] plus an offset: recolours (and tints grey) crops
    saturation_boost: float = 0.0      # scale each crop's chroma by a random factor in [1, 1 + b]
    grey_weight: float = 1.0           # how often a grey image is drawn, relative to a colour one
    val_size: int = 256                # validation images are centre-cropped to this size (a multiple of 8)
    max_val_images: int = 16
    cache_images: bool = True          # keep decoded training images in memory

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        return (self.crop_size,) if isinstance(self.crop_size, int) else tuple(self.crop_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0          # cosine decays to lr * min_lr_ratio
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 0.0             # max grad norm; 0 disables
    disc_lr: float | None = None       # None: same as lr
    disc_betas: tuple[float, float] = (0.5, 0.9)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSection:
    """The LDM objective: sums per image averaged over the batch (see klvae.torch.train.losses)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    chroma_weight: float = 0.0         # extra squared error off the grey axis (hue and saturation), per pixel
    perceptual_weight: float = 0.0
    lpips_weights: str | None = None   # a file; None searches the installed packages (see lpips.find_weights)
    allow_random_lpips: bool = False   # tests only: a randomly initialised LPIPS network
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    learn_logvar: bool = False
    disc_start: int = -1               # step from which the GAN term is on; -1 disables the discriminator
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    adaptive_disc_weight: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSection:
    output_dir: str = "runs/klvae"
    seed: int = 0
    precision: str = "fp32"            # "bf16": autocast for the forward pass (weights and optimiser stay fp32)
    ema_decay: float = 0.0             # 0 disables EMA
    num_threads: int = 0               # torch intra-op threads; 0 leaves torch's default
    log_every: int = 10
    val_every: int = 500
    sample_every: int = 500
    checkpoint_every: int = 500        # steps
    checkpoint_minutes: float = 0.0    # also checkpoint when this much wall time passed; 0 disables
    keep_checkpoints: int = 2
    progress: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    train: RunSection = dataclasses.field(default_factory=RunSection)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for section in out.values():
            for k, v in list(section.items()):
                if v is None:
                    del section[k]     # TOML has no null
                elif isinstance(v, tuple):
                    section[k] = list(v)
        return out

    def replace(self, **sections: Mapping[str, Any]) -> TrainConfig:
        """A copy with fields of some sections changed: ``cfg.replace(optim={"lr": 1e-5})``."""
        data = dataclasses.asdict(self)
        for name, changes in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown config section {name!r}; sections: {', '.join(_SECTIONS)}")
            data[name].update(changes)
        return TrainConfig.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """From TOML-like nested dicts; paths are taken as given (``load_train_config`` resolves a file's)."""
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; sections: {', '.join(_SECTIONS)}")
        sections = {}
        for name, klass in _SECTIONS.items():
            values = dict(data.get(name, {}))
            fields = {f.name: f for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - set(fields))
            if bad:
                raise ConfigError(f"{source}: [{name}] has unknown key(s) {', '.join(bad)}; "
                                  f"known: {', '.join(fields)}")
            for k, v in values.items():
                if isinstance(v, list) and k != "config":
                    values[k] = tuple(v)
            try:
                sections[name] = klass(**values)
            except TypeError as e:
                raise ConfigError(f"{source}: [{name}]: {e}") from None
        try:
            return cls(**sections)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "loss": LossSection,
             "train": RunSection}
_PATH_KEYS = {"train_dir", "val_dir", "output_dir", "pretrained", "lpips_weights"}


def _resolve_paths(values: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """A section's relative path values joined to ``base_dir`` (the folder of the file that set them)."""
    out = dict(values)
    for k, v in values.items():
        if k in _PATH_KEYS and isinstance(v, str) and v and not os.path.isabs(v):
            # ``pretrained`` may also be a hub repo id ("org/name"): resolved only when it is clearly a path.
            if k != "pretrained" or v.startswith((".", "~")) or os.path.exists(os.path.join(base_dir, v)):
                out[k] = os.path.normpath(os.path.join(base_dir, v))
    return out


def _read_toml(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The sections of a TOML config with its ``base`` chain merged in and every relative path made absolute
    against the folder of the file that set it."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: no such config file{where}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    folder = os.path.dirname(os.path.abspath(path))
    base = data.pop("base", None)
    sections = {name: _resolve_paths(values, folder) if isinstance(values, dict) else values
                for name, values in data.items()}
    if base is None:
        return sections
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another config file, got {base!r}")
    base_path = os.path.normpath(os.path.join(folder, base))
    if base_path in chain or base_path == os.path.abspath(path):
        raise ConfigError(f"{path}: base {base!r} makes a cycle ({' -> '.join(chain + (path, base_path))})")
    merged = _read_toml(base_path, chain + (os.path.abspath(path),))
    for name, values in sections.items():
        if name != "model" and isinstance(values, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **values}
        else:
            merged[name] = values
    return merged


def load_train_config(path: str | os.PathLike, overrides: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> TrainConfig:
    """Read a TOML training config (and its ``base`` chain); relative paths are taken relative to the folder of
    the file that sets them (overrides, as command-line flags: relative to the working directory)."""
    path = os.fspath(path)
    data = _read_toml(path)
    for name, changes in (overrides or {}).items():
        data[name] = {**data.get(name, {}), **_resolve_paths(changes, os.getcwd())}
    return TrainConfig.from_dict(data, source=path)


def dump_train_config(config: TrainConfig) -> str:
    """The config as TOML text (written next to checkpoints so a run records what it was)."""
    import tomli_w

    return tomli_w.dumps(config.to_dict())


def _validate(c: TrainConfig) -> None:
    def positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"[{section}] {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    if c.model.preset is not None and c.model.pretrained is not None:
        raise ConfigError("[model] give either preset or pretrained, not both")
    for name in ("batch_size", "val_size", "max_val_images"):
        positive("data", name, getattr(c.data, name))
    sizes = c.data.crop_sizes
    if not sizes or not all(isinstance(v, int) and v > 0 for v in sizes):
        raise ConfigError(f"[data] crop_size must be a positive integer or a list of them, got {c.data.crop_size!r}")
    if any(max(sizes) % v for v in sizes):
        raise ConfigError(f"[data] crop_size: each size must divide the largest (the batch of a smaller size is "
                          f"scaled by (largest / size)^2), got {list(sizes)}")
    if not 0 < c.data.min_scale <= 1:
        raise ConfigError(f"[data] min_scale must be in (0, 1], got {c.data.min_scale}")
    if not 0 <= c.data.saturation_boost <= 4:
        raise ConfigError(f"[data] saturation_boost must be in [0, 4], got {c.data.saturation_boost}")
    if not 0 <= c.data.color_jitter < 1:
        raise ConfigError(f"[data] color_jitter must be in [0, 1), got {c.data.color_jitter}")
    if not (c.data.grey_weight >= 0 and math.isfinite(c.data.grey_weight)):
        raise ConfigError(f"[data] grey_weight must be a finite number >= 0, got {c.data.grey_weight}")
    positive("optim", "lr", c.optim.lr)
    positive("optim", "max_steps", c.optim.max_steps)
    positive("optim", "grad_accum", c.optim.grad_accum)
    positive("optim", "warmup_steps", c.optim.warmup_steps, allow_zero=True)
    positive("optim", "weight_decay", c.optim.weight_decay, allow_zero=True)
    positive("optim", "grad_clip", c.optim.grad_clip, allow_zero=True)
    if c.optim.schedule not in SCHEDULES:
        raise ConfigError(f"[optim] schedule must be one of {', '.join(SCHEDULES)}, got {c.optim.schedule!r}")
    for name in ("l1_weight", "l2_weight", "chroma_weight", "perceptual_weight", "kl_weight", "disc_weight",
                 "disc_factor"):
        positive("loss", name, getattr(c.loss, name), allow_zero=True)
    if c.loss.l1_weight == 0 and c.loss.l2_weight == 0 and c.loss.perceptual_weight == 0:
        raise ConfigError("[loss] l1_weight, l2_weight and perceptual_weight are all zero: nothing to reconstruct")
    if c.loss.disc_loss not in DISC_LOSSES:
        raise ConfigError(f"[loss] disc_loss must be one of {', '.join(DISC_LOSSES)}, got {c.loss.disc_loss!r}")
    if c.train.precision not in PRECISIONS:
        raise ConfigError(f"[train] precision must be one of {', '.join(PRECISIONS)}, got {c.train.precision!r}")
    if not 0 <= c.train.ema_decay < 1:
        raise ConfigError(f"[train] ema_decay must be in [0, 1), got {c.train.ema_decay}")
    for name in ("log_every", "val_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
        positive("train", name, getattr(c.train, name))
