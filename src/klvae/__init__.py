"""klvae: the KL-regularised image autoencoder (AutoencoderKL) for PyTorch and JAX/Flax.

``import klvae`` is light: the config, presets and latent helpers load at once; ``klvae.AutoencoderKL`` (the
PyTorch model) imports torch on first use, and ``klvae.flax`` holds the Flax backend.
"""

from __future__ import annotations

import os as _os
from typing import Any

from klvae.config import PRESETS as PRESETS
from klvae.config import AutoencoderKLConfig as AutoencoderKLConfig
from klvae.config import AutoencoderKLFlux2Config as AutoencoderKLFlux2Config
from klvae.config import preset as preset
from klvae.errors import ConfigError as ConfigError
from klvae.errors import InputShapeError as InputShapeError
from klvae.errors import KLVAEError as KLVAEError
from klvae.errors import StateDictMismatchError as StateDictMismatchError
from klvae.errors import WeightsError as WeightsError
from klvae.latents import LatentScaling as LatentScaling
from klvae.latents import latent_scaling as latent_scaling
from klvae.latents import scale_latents as scale_latents
from klvae.latents import unscale_latents as unscale_latents

__version__ = "0.1.0"

#: The bundled default model (a diffusers-layout folder): a small KL-f8, 4-latent-channel AutoencoderKL trained by
#: ``python -m klvae.train.default_model`` on scikit-image's photographs. Loads with ``AutoencoderKL.from_pretrained``
#: and ``FlaxAutoencoderKL.from_pretrained``.
DEFAULT_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "default_model")

# Names served lazily from the PyTorch backend, so importing klvae does not import torch.
_TORCH_EXPORTS = {
    "AutoencoderKL": "klvae.torch.model",
    "AutoencoderKLFlux2": "klvae.torch.flux2",
    "AutoencoderKLOutput": "klvae.torch.outputs",
    "DecoderOutput": "klvae.torch.outputs",
    "DiagonalGaussianDistribution": "klvae.torch.outputs",
    "AttnProcessor": "klvae.torch.attention",
    "AttnProcessor2_0": "klvae.torch.attention",
    "ChunkedAttnProcessor": "klvae.torch.attention",
}

__all__ = ["AutoencoderKLConfig", "AutoencoderKLFlux2Config", "PRESETS", "preset", "LatentScaling",
           "latent_scaling", "scale_latents", "unscale_latents", "ConfigError",
           "InputShapeError", "KLVAEError", "StateDictMismatchError", "WeightsError", "DEFAULT_MODEL", *_TORCH_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _TORCH_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_TORCH_EXPORTS[name]), name)
    raise AttributeError(f"module 'klvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_EXPORTS))
