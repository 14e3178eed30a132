"""Load whichever member of the family a folder or single file holds: AutoencoderKL or AutoencoderKLFlux2.

For callers that take any model (the command line, the server, the cache); the classes' own loaders refuse the
other class's folders and files with an error naming the right class.
"""

from __future__ import annotations

import os
from typing import Any

from klvae.config import read_config_file
from klvae.hub import resolve_pretrained


def model_class(class_name: str) -> type:
    """The PyTorch class for a diffusers ``_class_name``."""
    from klvae.torch.flux2 import AutoencoderKLFlux2
    from klvae.torch.model import AutoencoderKL

    return {"AutoencoderKL": AutoencoderKL, "AutoencoderKLFlux2": AutoencoderKLFlux2}[class_name]


def from_pretrained(path: str | os.PathLike, **kwargs: Any):
    """``cls.from_pretrained(path, **kwargs)`` with ``cls`` the class its config.json names."""
    options = {k: kwargs[k] for k in ("subfolder", "variant", "cache_dir", "local_files_only", "revision", "token")
               if k in kwargs}
    config_path, _ = resolve_pretrained(path, **options)
    return model_class(read_config_file(config_path).class_name).from_pretrained(path, **kwargs)


def from_single_file(path: str | os.PathLike, config: Any = None, torch_dtype: Any = None, **kwargs: Any):
    """A model of the class the single file holds (FLUX.2's VAE or an AutoencoderKL)."""
    from klvae.torch.single_file import load_single_file

    return load_single_file(None, path, config, torch_dtype, choose_class=model_class, **kwargs)
