"""Single-file checkpoints for the PyTorch model: ``from_single_file`` and export to the original layout."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from klvae.config import AutoencoderKLConfig
from klvae.errors import WeightsError
from klvae.fileio import atomic_write_with
from klvae.torch.state_dict import as_torch_dtype, build_from_state_dict
from klvae.weights.layout import check_shapes, state_dict_shapes
from klvae.weights.original import VAE_PREFIXES, diffusers_to_original
from klvae.weights.single_file import PICKLE_SUFFIXES, read_vae, single_file_metadata

# diffusers' from_single_file arguments that change nothing here (downloads go through huggingface_hub).
_IGNORED_KWARGS = {"force_download", "proxies", "low_cpu_mem_usage", "disable_mmap", "config_revision"}


def load_single_file(cls, path_or_url: str | os.PathLike, config: Any = None,
                     torch_dtype: torch.dtype | str | None = None, *,
                     choose_class: Callable[[str], type] | None = None, **kwargs: Any):
    """A ``cls`` model from a single-file checkpoint (``cls=None``: ``choose_class(class name the file holds)``);
    see :meth:`PretrainedMixin.from_single_file`."""
    options = {k: kwargs.pop(k) for k in ("subfolder", "cache_dir", "local_files_only", "revision", "token")
               if k in kwargs}
    if kwargs.pop("original_config", None) is not None:
        raise TypeError("original_config (an LDM yaml) is not supported: the architecture is inferred from the "
                        "weights; pass config= (a preset name, diffusers folder, config.json or dict) instead")
    unknown = set(kwargs) - _IGNORED_KWARGS
    if unknown:
        raise TypeError(f"from_single_file got unexpected arguments: {', '.join(sorted(unknown))}")
    weights = read_vae(path_or_url, config, config_class=cls.config_class if cls else AutoencoderKLConfig,
                       **{k: v for k, v in options.items() if v is not None})
    cls = cls or choose_class(weights.config.class_name)
    return build_from_state_dict(cls, weights.config, weights.state_dict, dtype=as_torch_dtype(torch_dtype),
                                 source=weights.source)


def original_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                        dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """A canonical state dict in the original layout, cast to ``dtype`` if given, contiguous and detached."""
    dtype = as_torch_dtype(dtype)
    tensors = diffusers_to_original({k: v.detach() for k, v in state_dict.items()}, prefix=prefix)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in tensors.items()}


def write_single_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: AutoencoderKLConfig,
                      *, prefix: str = "", dtype: torch.dtype | str | None = None) -> None:
    """Write a canonical state dict as one original-layout file; see :func:`save_single_file`."""
    path = os.fspath(path)
    if prefix not in ("",) + VAE_PREFIXES:
        raise ValueError(f"prefix must be one of {('',) + VAE_PREFIXES}, got {prefix!r}")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a folder; a single file is written here")
    if not path.endswith((".safetensors",) + PICKLE_SUFFIXES):
        raise WeightsError(f"{path}: unknown file type; use .safetensors (recommended), .ckpt, .pt, .pth or .bin")
    check_shapes(state_dict_shapes(config), {k: tuple(v.shape) for k, v in state_dict.items()}, path)
    tensors = original_state_dict(state_dict, prefix, dtype)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = single_file_metadata(config)
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        atomic_write_with(path, lambda tmp: torch.save({"state_dict": tensors}, tmp))


def save_single_file(model: torch.nn.Module, path: str | os.PathLike, *, prefix: str = "",
                     dtype: torch.dtype | str | None = None) -> None:
    """Write ``model`` as one original-layout file (what LDM/SGM code, ComfyUI and A1111 load).

    ``.safetensors`` files carry the config in their metadata, so ``from_single_file`` restores the exact
    config, latent factors included. ``.ckpt``/``.pt``/``.pth``/``.bin`` hold ``{"state_dict": ...}`` as the
    original checkpoints do. ``prefix`` may be ``"first_stage_model."`` or ``"vae."`` to nest the keys as in a
    full checkpoint. The file is written atomically: on any error no partial file is left.
    """
    write_single_file(path, model.state_dict(), model.config, prefix=prefix, dtype=dtype)
