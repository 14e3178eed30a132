"""Load whichever member of the family a folder or single file holds, as ``(model, params)`` (Flax)."""

from __future__ import annotations

import os
from typing import Any

from klvae.config import read_config_file
from klvae.hub import resolve_pretrained


def model_class(class_name: str) -> type:
    """The Flax class for a diffusers ``_class_name``."""
    from klvae.flax.flux2 import FlaxAutoencoderKLFlux2
    from klvae.flax.model import FlaxAutoencoderKL

    return {"AutoencoderKL": FlaxAutoencoderKL, "AutoencoderKLFlux2": FlaxAutoencoderKLFlux2}[class_name]


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> tuple[Any, Any]:
    """``cls.from_pretrained(path, **kwargs)`` with ``cls`` the class its config.json names."""
    options = {k: kwargs[k] for k in ("subfolder", "variant", "cache_dir", "local_files_only", "revision", "token")
               if k in kwargs}
    config_path, _ = resolve_pretrained(path, **options)
    return model_class(read_config_file(config_path).class_name).from_pretrained(path, **kwargs)


def from_single_file(path: str | os.PathLike, config: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, params)`` of the class the single file holds."""
    from klvae.flax.single_file import load_single_file

    return load_single_file(None, path, config, choose_class=model_class, **kwargs)
