"""Canonical state dicts for the PyTorch models: reading weight files, checking keys and shapes, and building a
model around the tensors (no throwaway random init). Legacy ``.bin`` files are read with
``torch.load(weights_only=True)`` only: no pickled code runs. Both folder loading and single files build here.
"""

from __future__ import annotations

import torch

from klvae.config import AutoencoderKLConfig
from klvae.errors import WeightsError
from klvae.weights.files import load_weights
from klvae.weights.layout import check_shapes, rename_legacy_attention_keys, state_dict_shapes

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
_MODEL_NAMES = {"AutoencoderKL": "an SD/SDXL/SD3/FLUX.1-style VAE", "AutoencoderKLFlux2": "FLUX.2's VAE"}


def as_torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (``"bf16"``, ``"float16"``, ``"torch.float32"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, a shard index, or a legacy ``.bin`` (weights-only unpickling)."""
    return load_weights(path, "torch", load_pickled_weights)


def load_pickled_weights(path: str) -> dict[str, torch.Tensor]:
    """A legacy ``.bin`` state dict through ``torch.load(weights_only=True)``: no pickled code can run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read as a weights-only PyTorch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def canonical_state_dict(tensors: dict[str, torch.Tensor], config: AutoencoderKLConfig,
                         source: str) -> dict[str, torch.Tensor]:
    """Rename legacy attention keys and check keys and shapes strictly against ``config``."""
    renames = rename_legacy_attention_keys(list(tensors))
    if renames:
        tensors = {renames.get(k, k): v for k, v in tensors.items()}
    check_shapes(state_dict_shapes(config), {k: tuple(v.shape) for k, v in tensors.items()}, source)
    return tensors


def build_from_state_dict(cls, config: AutoencoderKLConfig, tensors: dict[str, torch.Tensor], *,
                          dtype: torch.dtype | None, source: str):
    """A model of ``cls`` whose parameters are ``tensors`` (cast to ``dtype``, default float32)."""
    if type(config) is not cls.config_class:
        raise WeightsError(f"{source}: holds an {config.class_name} ({_MODEL_NAMES.get(config.class_name, '')}), "
                           f"not an {cls.config_class.class_name}; load it with klvae.{config.class_name}")
    tensors = canonical_state_dict(tensors, config, source)
    dtype = dtype or torch.get_default_dtype()
    with torch.device("meta"):
        model = cls(config)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
