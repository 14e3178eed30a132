"""Latent scaling: the conventions diffusion pipelines apply between the VAE and the denoiser.

``encode``/``decode`` never scale. These helpers do, for any array type (torch, jax or numpy), from either
backend's config or model. A convention is data (:class:`LatentScaling`), one of:

- SD 1.x/2.x and SDXL: ``z * scaling_factor`` (inverse ``z / scaling_factor``);
- SD3 and FLUX (``shift_factor`` set): ``(z - shift_factor) * scaling_factor`` (inverse ``z / s + shift``);
- latents_mean/latents_std set (SDXL-based Playground v2.5 and others): ``(z - mean) * s / std`` per channel
  (inverse ``z * std / s + mean``), channels on axis 1 (NCHW);
- FLUX.2 (``patch_size`` set): patchify 2x2 channel-major (B, 32, h, w) -> (B, 128, h/2, w/2) as FLUX.2's
  pipeline does, then the per-channel rule with ``s = 1``, mean = the BatchNorm's ``running_mean`` and
  std = ``sqrt(running_var + eps)``. The statistics live in the weights, so the convention comes from the model
  (``scale_latents(z, vae)``; Flax: ``scale_latents(z, model, params)``), not from its config alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from klvae.errors import ConfigError, InputShapeError

Array = TypeVar("Array")

#: The fields of a convention, as written into latent files' metadata.
SCALING_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "patch_size")


@dataclasses.dataclass(frozen=True)
class LatentScaling:
    """One latent convention: ``patchify`` (if ``patch_size``), then ``(z - shift) * s`` or per-channel
    ``(z - mean) * s / std`` or ``z * s``. :meth:`scale` maps VAE latents to what the denoiser sees;
    :meth:`unscale` is its inverse."""

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    patch_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        s = self.scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s == 0:
            raise ConfigError(f"scaling_factor must be a finite non-zero number, got {s!r}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ConfigError("latents_mean and latents_std must be given together")
        if self.latents_mean is not None:
            object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
            object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
            if len(self.latents_mean) != len(self.latents_std):
                raise ConfigError(f"latents_mean has {len(self.latents_mean)} values, latents_std "
                                  f"{len(self.latents_std)}")
            if not all(v > 0 and math.isfinite(v) for v in self.latents_std):
                raise ConfigError("latents_std must be positive and finite")
        if self.patch_size is not None:
            patch = tuple(self.patch_size)
            if len(patch) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch):
                raise ConfigError(f"patch_size must be two positive integers, got {self.patch_size!r}")
            object.__setattr__(self, "patch_size", patch)

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> LatentScaling:
        """From a config or a latent file's metadata (missing fields take their defaults)."""
        values = {name: fields.get(name) for name in SCALING_FIELDS if fields.get(name) is not None}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what latent files store)."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in SCALING_FIELDS}

    def scale(self, z: Array) -> Array:
        """Raw VAE latents (``posterior.mode()`` or ``.sample()``) -> the denoiser's latents."""
        if self.patch_size is not None:
            z = patchify(z, self.patch_size)
        s = self.scaling_factor
        if self.latents_mean is not None:
            return (z - _per_channel(self.latents_mean, z)) * s / _per_channel(self.latents_std, z)
        if self.shift_factor is not None:
            return (z - self.shift_factor) * s
        return z * s

    def unscale(self, z: Array) -> Array:
        """The inverse of :meth:`scale`: the denoiser's latents -> what ``decode`` expects."""
        s = self.scaling_factor
        if self.latents_mean is not None:
            z = z * _per_channel(self.latents_std, z) / s + _per_channel(self.latents_mean, z)
        elif self.shift_factor is not None:
            z = z / s + self.shift_factor
        else:
            z = z / s
        return unpatchify(z, self.patch_size) if self.patch_size is not None else z

    def scale_logvar(self, logvar: Array) -> Array:
        """The posterior's log-variance in the scaled space (so scaled mean and log-variance sample together):
        patchified like the latents, plus ``2 log(s / std)`` per channel (``2 log |s|`` for scalar rules)."""
        if self.patch_size is not None:
            logvar = patchify(logvar, self.patch_size)
        if self.latents_mean is not None:
            return logvar + _per_channel([2 * math.log(abs(self.scaling_factor) / v) for v in self.latents_std],
                                         logvar)
        return logvar + 2 * math.log(abs(self.scaling_factor))

    def scaled_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape :meth:`scale` gives latents of (B, C, h, w) ``shape``."""
        if self.patch_size is None:
            return tuple(shape)
        ph, pw = self.patch_size
        return (*shape[:-3], shape[-3] * ph * pw, shape[-2] // ph, shape[-1] // pw)


def batch_norm_scaling(running_mean: Any, running_var: Any, eps: float,
                       patch_size: Sequence[int] = (2, 2)) -> LatentScaling:
    """FLUX.2's convention from its BatchNorm statistics (any array type): mean, ``sqrt(var + eps)``."""
    mean = [float(v) for v in _host_values(running_mean)]
    var = [float(v) for v in _host_values(running_var)]
    if len(mean) != len(var):
        raise ConfigError(f"running_mean has {len(mean)} values, running_var {len(var)}")
    if any(not v + eps > 0 for v in var):
        raise ConfigError("running_var + eps must be positive")
    return LatentScaling(latents_mean=tuple(mean), latents_std=tuple(math.sqrt(v + eps) for v in var),
                         patch_size=tuple(patch_size))


def latent_scaling(source: Any, params: Any = None) -> LatentScaling:
    """The convention of ``source``: a :class:`LatentScaling`, a config or latent-file metadata (a mapping), a
    PyTorch model, or a Flax model with its ``params``. FLUX.2's needs the model (its statistics are weights)."""
    if isinstance(source, LatentScaling):
        return source
    config = source if isinstance(source, Mapping) else getattr(source, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"cannot find a latent convention in {type(source).__name__}: pass a config, a model or "
                        "a LatentScaling")
    patch = getattr(config, "latent_patch_size", None)
    if patch is None:
        return LatentScaling.from_mapping(config)
    eps = config["batch_norm_eps"]
    if params is not None:  # Flax: the statistics sit in params["bn"]
        tree = params.get("params", params)
        if "bn" not in tree:
            raise ConfigError("params has no 'bn' entry: FLUX.2's latent statistics are missing")
        return batch_norm_scaling(tree["bn"]["running_mean"], tree["bn"]["running_var"], eps, patch)
    bn = getattr(source, "bn", None)
    if bn is None or not hasattr(bn, "running_mean"):
        raise ConfigError("FLUX.2's latents are normalised by the BatchNorm statistics in its weights, which a "
                          "config does not hold: pass the model (scale_latents(z, vae)), a Flax model with its "
                          "params (scale_latents(z, model, params)) or klvae.latents.batch_norm_scaling(...)")
    return batch_norm_scaling(bn.running_mean, bn.running_var, eps, patch)


def scale_latents(z: Array, source: Any, params: Any = None) -> Array:
    """Map raw VAE latents (``posterior.mode()`` or ``.sample()``) to the scaled space the denoiser sees.
    ``source`` as :func:`latent_scaling` takes it (a config, model, metadata or :class:`LatentScaling`)."""
    return latent_scaling(source, params).scale(z)


def unscale_latents(z: Array, source: Any, params: Any = None) -> Array:
    """Inverse of :func:`scale_latents`: map denoiser latents back to what ``decode`` expects."""
    return latent_scaling(source, params).unscale(z)


def describe_convention(config: Mapping[str, Any]) -> str:
    """One line naming a config's latent convention, for listings: ``z * 0.18215``, ``(z - 0.1159) * 0.3611``,
    ``(z - mean[c]) * 0.5 / std[c]``, ``patchify 2x2, then (z - bn.running_mean) / sqrt(bn.running_var + 1e-4)``."""
    patch = getattr(config, "latent_patch_size", None)
    if patch is not None:
        return (f"patchify {patch[0]}x{patch[1]}, then (z - bn.running_mean) / sqrt(bn.running_var + "
                f"{config['batch_norm_eps']:g})")
    scaling = LatentScaling.from_mapping(config)
    s = f"{scaling.scaling_factor:g}"
    if scaling.latents_mean is not None:
        return f"(z - mean[c]) * {s} / std[c]"
    if scaling.shift_factor is not None:
        return f"(z - {scaling.shift_factor:g}) * {s}"
    return f"z * {s}"


# ---------------------------------------------------------------------- FLUX.2's 2x2 patches
def patchify(z: Array, patch_size: Sequence[int] = (2, 2)) -> Array:
    """(B, C, H, W) -> (B, C * ph * pw, H / ph, W / pw), channel-major: channel c's patch is channels
    ``c*ph*pw ... (c+1)*ph*pw - 1``, row by row (FLUX.2's order)."""
    ph, pw = patch_size
    if len(z.shape) != 4 or z.shape[2] % ph or z.shape[3] % pw:
        raise InputShapeError(f"latents of shape {tuple(z.shape)}: patchifying needs (B, C, H, W) with H and W "
                              f"multiples of the patch ({ph}, {pw})")
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // ph, ph, w // pw, pw)
    return _permute(z, (0, 1, 3, 5, 2, 4)).reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchify(z: Array, patch_size: Sequence[int] = (2, 2)) -> Array:
    """The inverse of :func:`patchify`: (B, C * ph * pw, h, w) -> (B, C, h * ph, w * pw)."""
    ph, pw = patch_size
    if len(z.shape) != 4 or z.shape[1] % (ph * pw):
        raise InputShapeError(f"latents of shape {tuple(z.shape)}: unpatchifying needs (B, C, h, w) with C a "
                              f"multiple of {ph * pw}")
    b, c, h, w = z.shape
    z = z.reshape(b, c // (ph * pw), ph, pw, h, w)
    return _permute(z, (0, 1, 4, 2, 5, 3)).reshape(b, c // (ph * pw), h * ph, w * pw)


def _permute(x: Any, axes: tuple[int, ...]) -> Any:
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)  # torch | numpy, jax


def _host_values(values: Any) -> list:
    if hasattr(values, "detach"):  # torch
        values = values.detach().cpu().double()
    return list(values.tolist()) if hasattr(values, "tolist") else list(values)


def _per_channel(values: Sequence[float], like: Any) -> Any:
    """``values`` as an array broadcasting over axis 1 of ``like`` (shape (1, C, 1, ..., 1)), same type and dtype."""
    shape = (1, len(values)) + (1,) * (like.ndim - 2)
    if like.ndim < 2 or like.shape[1] != len(values):
        raise InputShapeError(f"latents of shape {tuple(like.shape)} do not have {len(values)} channels on axis 1")
    if hasattr(like, "new_tensor"):  # torch
        return like.new_tensor(list(values)).reshape(shape)
    import numpy as np

    out = np.asarray(values, dtype=np.float64).reshape(shape)
    # Keep the latents' float dtype (bf16 included); integer inputs compute in float64.
    return out.astype(like.dtype) if np.dtype(like.dtype).kind not in "biu" else out
