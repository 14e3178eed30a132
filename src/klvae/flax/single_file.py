"""Single-file checkpoints for the Flax model: ``from_single_file`` and export to the original layout.

Reading is shared with the PyTorch backend (:func:`klvae.weights.single_file.read_vae` with numpy arrays);
safetensors files need no torch, ``.ckpt``/``.pt``/``.bin`` pickles do (weights-only unpickling).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klvae.config import AutoencoderKLConfig
from klvae.errors import WeightsError
from klvae.fileio import atomic_write_with
from klvae.weights.flax import as_numpy_dtype, canonical_to_flax, flax_to_canonical
from klvae.weights.original import VAE_PREFIXES, diffusers_to_original
from klvae.weights.single_file import read_vae, single_file_metadata

_SOURCE_OPTIONS = ("subfolder", "cache_dir", "local_files_only", "revision", "token")


def load_single_file(cls, path_or_url: str | os.PathLike, config: Any = None, *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, precision: Any = None,
                     choose_class: Callable[[str], type] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, params)`` from a single-file checkpoint (``cls=None``: ``choose_class(class name the file
    holds)``); see :meth:`FlaxPretrainedMixin.from_single_file`."""
    options = {k: kwargs.pop(k) for k in _SOURCE_OPTIONS if k in kwargs}
    weights = read_vae(path_or_url, config, framework="numpy",
                       config_class=cls.config_class if cls else AutoencoderKLConfig,
                       **{k: v for k, v in options.items() if v is not None})
    cls = cls or choose_class(weights.config.class_name)
    params = canonical_to_flax(weights.state_dict, weights.config, dtype=as_numpy_dtype(jnp.dtype(param_dtype)),
                               source=weights.source)
    model = cls.from_config(weights.config, dtype=dtype, param_dtype=param_dtype, precision=precision, **kwargs)
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def save_single_file(model: Any, params: Any, path: str | os.PathLike, *, prefix: str = "",
                     dtype: Any = None) -> None:
    """Write ``params`` as one original-layout ``.safetensors`` file (config in its metadata), atomically."""
    path = os.fspath(path)
    if prefix not in ("",) + VAE_PREFIXES:
        raise ValueError(f"prefix must be one of {('',) + VAE_PREFIXES}, got {prefix!r}")
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: the Flax backend writes .safetensors single files only")
    canonical = flax_to_canonical(params, model.config, dtype=dtype, source="params")
    tensors = diffusers_to_original(canonical, prefix=prefix)
    from safetensors.numpy import save_file

    metadata = single_file_metadata(model.config)
    atomic_write_with(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                                                               metadata=metadata))
