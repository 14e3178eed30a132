"""Reading and writing diffusers-layout model folders for the PyTorch model (``PretrainedMixin``).

Loading builds the model on the meta device and assigns the loaded tensors after a strict check of keys and
shapes (:mod:`klvae.torch.state_dict`). Single files are :mod:`klvae.torch.single_file`'s.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from klvae.config import CONFIG_NAME, AutoencoderKLConfig
from klvae.fileio import atomic_write_with
from klvae.hub import resolve_pretrained
from klvae.torch.state_dict import as_torch_dtype, build_from_state_dict, load_weights_file
from klvae.weights.files import weights_name


class PretrainedMixin:
    """``from_pretrained``/``save_pretrained`` in diffusers' folder layout."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | str | None = None, variant: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False, revision: str | None = None,
                        token: str | bool | None = None, **kwargs: Any):
        """Load a diffusers-layout folder (``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``)
        from disk or the hub. The model is returned in eval mode."""
        unknown = set(kwargs) - {"use_safetensors", "low_cpu_mem_usage", "force_download", "proxies"}
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments: {', '.join(sorted(unknown))}")
        config_path, weights_path = resolve_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, variant=variant, cache_dir=cache_dir,
            local_files_only=local_files_only, revision=revision, token=token)
        config = cls.config_class.from_json_file(config_path)
        tensors = load_weights_file(weights_path)
        return build_from_state_dict(cls, config, tensors, dtype=as_torch_dtype(torch_dtype), source=weights_path)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, config: Any = None,
                         torch_dtype: torch.dtype | str | None = None, **kwargs: Any):
        """Load a single-file checkpoint (original or diffusers layout; a bare VAE or a full model holding one),
        from a path or a hub file URL; ``config`` is a preset name, diffusers folder, config.json, dict or hub
        repo id, else inferred from the weights. See :mod:`klvae.torch.single_file`."""
        from klvae.torch.single_file import load_single_file

        return load_single_file(cls, pretrained_model_link_or_path, config, torch_dtype, **kwargs)

    def save_single_file(self, path: str | os.PathLike, *, prefix: str = "",
                         dtype: torch.dtype | str | None = None) -> None:
        """Write the weights as one original-layout file (see :func:`klvae.torch.single_file.save_single_file`)."""
        from klvae.torch.single_file import save_single_file

        save_single_file(self, path, prefix=prefix, dtype=dtype)

    @classmethod
    def from_config(cls, config: AutoencoderKLConfig | dict[str, Any], **overrides: Any):
        """A randomly initialised model from a config (diffusers' ``from_config``)."""
        return cls(config if isinstance(config, AutoencoderKLConfig) else cls.config_class.from_dict(config),
                   **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, is_main_process: bool = True, **kwargs: Any) -> None:
        """Write ``config.json`` and the weights in diffusers' layout; each file is written atomically."""
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"{save_directory}: is a file; save_pretrained needs a directory")
        os.makedirs(save_directory, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        path = os.path.join(save_directory, weights_name(variant, safe_serialization))
        if safe_serialization:
            from safetensors.torch import save_file

            atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        else:
            atomic_write_with(path, lambda tmp: torch.save(tensors, tmp))
        self.config.to_json_file(os.path.join(save_directory, CONFIG_NAME))
