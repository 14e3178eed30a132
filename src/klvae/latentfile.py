"""Latent files: safetensors with a ``klvae_latents`` JSON metadata entry saying how the latents were made.

The metadata records the model (name, backend, dtype, config), whether latent scaling was applied
(``scaled``) and with which convention (``scaling``: :class:`klvae.latents.LatentScaling`'s fields, FLUX.2's
BatchNorm statistics and patch size included), and for a single image its ``source_size`` (height, width
before padding to the model's factor), so ``klvae decode`` can undo the scaling and crop back. Latent cache
shards (:mod:`klvae.cache`) carry the same entry. Files without it (latents saved by other tools) read too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from klvae.errors import KLVAEError
from klvae.fileio import atomic_write_with

METADATA_KEY = "klvae_latents"
STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class LatentFileError(KLVAEError):
    """A latent file cannot be read: missing, not a latent format, corrupt metadata, or empty."""


def model_metadata(runner: Any) -> dict[str, Any]:
    """What an output file records about the model that made it (``runner``: a loaded model with ``source``,
    ``backend``, ``dtype`` and ``config``, such as :class:`klvae.cli.common.Runner`)."""
    return {"model": runner.source.name, "backend": runner.backend, "dtype": runner.dtype,
            "config": runner.config.to_diffusers_dict()}


def latent_metadata(runner: Any, scaled: bool, **extra: Any) -> dict[str, Any]:
    from klvae import __version__

    return {**model_metadata(runner), "scaled": scaled, "scaling": runner.scaling.to_dict(),
            "klvae_version": __version__, **extra}


def write_latents(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` and the metadata atomically (a reader never sees a partial file)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = {"format": "np", METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_latents(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """``(tensors, klvae metadata or None)`` of a ``.safetensors`` or ``.npy`` latent file."""
    if not os.path.isfile(path):
        raise LatentFileError(f"{path}: no such file")
    if path.endswith(".npy"):
        try:
            return {"latents": np.load(path, allow_pickle=False)}, None
        except (ValueError, OSError) as e:
            raise LatentFileError(f"{path}: cannot read as a .npy array ({e})") from None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' errors name no file
        raise LatentFileError(f"{path}: cannot read as a safetensors file ({type(e).__name__}: {e})") from None
    meta = None
    if METADATA_KEY in header:
        try:
            meta = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise LatentFileError(f"{path}: corrupt {METADATA_KEY} metadata ({e})") from None
    if not tensors:
        raise LatentFileError(f"{path}: holds no tensors")
    return tensors, meta
