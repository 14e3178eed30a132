"""Reading and writing diffusers-layout model folders for the Flax model.

The folder is the canonical one (``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``, in
diffusers' PyTorch layout), so one folder serves both backends and diffusers. Tensors are read with numpy
(bf16 through ml_dtypes), converted strictly by :mod:`klvae.weights.flax`, and never touch torch, except for
legacy ``.bin`` pickles, which need torch to read (weights-only unpickling).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klvae.config import CONFIG_NAME
from klvae.errors import WeightsError
from klvae.fileio import atomic_write_with
from klvae.hub import resolve_pretrained
from klvae.weights.files import load_weights, weights_name
from klvae.weights.flax import as_numpy_dtype, canonical_to_flax, flax_to_canonical, to_numpy


def load_numpy_weights(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, a shard index, or (with torch installed) a legacy ``.bin``."""
    return load_weights(path, "numpy", _load_pickle_as_numpy)


def _load_pickle_as_numpy(path: str) -> dict[str, np.ndarray]:
    try:
        from klvae.torch.state_dict import load_pickled_weights
    except ImportError:
        raise WeightsError(f"{path}: reading a PyTorch pickle needs torch; convert the folder to safetensors "
                           "(klvae's torch backend: AutoencoderKL.from_pretrained(...).save_pretrained(...))") from None
    return {k: to_numpy(v, k, path) for k, v in load_pickled_weights(path).items()}


class FlaxPretrainedMixin:
    """``from_pretrained`` -> ``(model, params)`` and ``save_pretrained(dir, params)`` in diffusers' layout."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, from_pt: bool = True,
                        dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: Any = None,
                        subfolder: str | None = None, variant: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        token: str | bool | None = None, **fields: Any) -> tuple[Any, dict[str, Any]]:
        """Load a diffusers PyTorch-layout folder (local path or hub repo id) as ``(model, params)``.

        ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (float32 by default: fp16/bf16
        checkpoints are widened exactly). ``fields`` sets other module fields (``use_tiling=True``, ...).
        ``from_pt`` must be true: klvae's one weight format is the PyTorch layout (diffusers' Flax
        ``.msgpack`` checkpoints are not read).
        """
        if not from_pt:
            raise WeightsError("klvae reads only the canonical PyTorch-layout folders (from_pt=True); to use a "
                               "Flax parameter tree, pass it to klvae.weights.flax.flax_to_canonical to check it")
        config_path, weights_path = resolve_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, variant=variant, cache_dir=cache_dir,
            local_files_only=local_files_only, revision=revision, token=token)
        config = cls.config_class.from_json_file(config_path)
        tensors = load_numpy_weights(weights_path)
        params = canonical_to_flax(tensors, config, dtype=as_numpy_dtype(jnp.dtype(param_dtype)),
                                   source=weights_path)
        model = cls.from_config(config, dtype=dtype, param_dtype=param_dtype, precision=precision, **fields)
        return model, jax.tree_util.tree_map(jnp.asarray, params)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, config: Any = None,
                         **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """``(model, params)`` from a single-file checkpoint (original or diffusers layout; bare VAE or full
        model), a path or hub file URL; ``config`` as for the torch model, else inferred. Takes ``dtype``,
        ``param_dtype``, ``precision`` as :meth:`from_pretrained` does. See :mod:`klvae.flax.single_file`."""
        from klvae.flax.single_file import load_single_file

        return load_single_file(cls, pretrained_model_link_or_path, config, **kwargs)

    def save_single_file(self, params: Any, path: str | os.PathLike, *, prefix: str = "", dtype: Any = None) -> None:
        """Write ``params`` as one original-layout ``.safetensors`` file (see :mod:`klvae.flax.single_file`)."""
        from klvae.flax.single_file import save_single_file

        save_single_file(self, params, path, prefix=prefix, dtype=dtype)

    def save_pretrained(self, save_directory: str | os.PathLike, params: Any, *, variant: str | None = None,
                        dtype: Any = None, is_main_process: bool = True) -> None:
        """Write ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` in the canonical layout,
        which klvae (both backends) and diffusers load. ``dtype`` casts the saved weights (default: as stored).
        Each file is written atomically."""
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"{save_directory}: is a file; save_pretrained needs a directory")
        tensors = flax_to_canonical(params, self.config, dtype=dtype, source="params")
        os.makedirs(save_directory, exist_ok=True)
        from safetensors.numpy import save_file

        path = os.path.join(save_directory, weights_name(variant))
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        self.config.to_json_file(os.path.join(save_directory, CONFIG_NAME))
