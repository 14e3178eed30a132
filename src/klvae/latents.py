"""Latent scaling: the conventions diffusion pipelines apply between the VAE and the denoiser.

``encode``/``decode`` never scale. These helpers do, for any array type (torch, jax or numpy) and either
backend's config:

- SD 1.x/2.x and SDXL: ``z * scaling_factor`` (inverse ``z / scaling_factor``);
- SD3 and FLUX (``shift_factor`` set): ``(z - shift_factor) * scaling_factor`` (inverse ``z / s + shift``);
- latents_mean/latents_std set (SDXL-based Playground v2.5 and others): ``(z - mean) * s / std`` per channel
  (inverse ``z * std / s + mean``), channels on axis 1 (NCHW).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Array = TypeVar("Array")


def scale_latents(z: Array, config: Mapping[str, Any]) -> Array:
    """Map raw VAE latents (``posterior.mode()`` or ``.sample()``) to the scaled space the denoiser sees."""
    s = config["scaling_factor"]
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        return (z - _per_channel(mean, z)) * s / _per_channel(std, z)
    shift = config.get("shift_factor")
    if shift is not None:
        return (z - shift) * s
    return z * s


def unscale_latents(z: Array, config: Mapping[str, Any]) -> Array:
    """Inverse of :func:`scale_latents`: map denoiser latents back to what ``decode`` expects."""
    s = config["scaling_factor"]
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        return z * _per_channel(std, z) / s + _per_channel(mean, z)
    shift = config.get("shift_factor")
    if shift is not None:
        return z / s + shift
    return z / s


def _per_channel(values: Sequence[float], like: Any) -> Any:
    """``values`` as an array broadcasting over axis 1 of ``like`` (shape (1, C, 1, ..., 1)), same type and dtype."""
    shape = (1, len(values)) + (1,) * (like.ndim - 2)
    if like.ndim < 2 or like.shape[1] != len(values):
        from klvae.errors import InputShapeError

        raise InputShapeError(f"latents of shape {tuple(like.shape)} do not have {len(values)} channels on axis 1")
    if hasattr(like, "new_tensor"):  # torch
        return like.new_tensor(list(values)).reshape(shape)
    import numpy as np

    out = np.asarray(values, dtype=np.float64).reshape(shape)
    # Keep the latents' float dtype (bf16 included); integer inputs compute in float64.
    return out.astype(like.dtype) if np.dtype(like.dtype).kind not in "biu" else out
