"""Conversion between the canonical (diffusers PyTorch) state_dict and the Flax parameter tree (numpy only).

The Flax tree uses the names of diffusers' and maxdiffusion's Flax VAE, so their parameter trees fit too:

=====================================================  ==========================================================
canonical key                                          Flax path
=====================================================  ==========================================================
``encoder.down_blocks.0.resnets.1.conv1.weight``       ``encoder/down_blocks_0/resnets_1/conv1/kernel``
``...downsamplers.0.conv.weight``                      ``.../downsamplers_0/conv/kernel``
``...mid_block.attentions.0.to_q.weight``              ``.../mid_block/attentions_0/query/kernel``
``...to_k`` / ``to_v`` / ``to_out.0``                  ``key`` / ``value`` / ``proj_attn``
``...norm1.weight`` (any GroupNorm)                    ``.../norm1/scale``
``bn.running_mean`` (FLUX.2's latent statistics)       ``bn/running_mean`` (also ``running_var``,
                                                       ``num_batches_tracked``: int32 in JAX, int64 in torch)
=====================================================  ==========================================================

Conv weights go OIHW -> HWIO (``transpose(2, 3, 1, 0)``), Linear weights (out, in) -> (in, out); biases and norm
parameters keep their shape. Both directions are strict: missing, unexpected and mis-shaped entries are listed in a
:class:`~klvae.errors.StateDictMismatchError`. Values are copied exactly (transposes only); a dtype is applied only
when asked for. This module imports neither torch nor jax: it accepts anything ``numpy.asarray`` understands
(jax arrays included) and torch tensors by duck typing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from klvae.config import AutoencoderKLConfig
from klvae.errors import WeightsError
from klvae.weights.layout import (BATCH_NORM_KEYS, Shape, check_shapes, rename_legacy_attention_keys,
                                  state_dict_shapes)

FlaxPath = tuple[str, ...]

# Module lists whose ``name.N`` becomes ``name_N`` (linen's naming of submodule lists built in setup()).
_LIST_MODULES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers"})
# Attention projections: canonical name -> Flax name.
_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# Leaf kinds and the axis permutation taking the canonical array to the Flax one.
_PERMUTATIONS = {"conv": (2, 3, 1, 0), "linear": (1, 0), "scale": None, "bias": None, "buffer": None}
_INVERSE = {"conv": (3, 2, 0, 1), "linear": (1, 0), "scale": None, "bias": None, "buffer": None}

_DTYPE_NAMES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
                "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
                "float64": np.float64}


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """Where one canonical tensor lives in the Flax tree and how its axes move."""

    path: FlaxPath   # e.g. ("encoder", "conv_in", "kernel")
    kind: str        # "conv", "linear", "scale", "bias" or "buffer" (statistics, kept by name)
    shape: Shape     # the Flax shape

    @property
    def key(self) -> str:
        return "/".join(self.path)


def as_numpy_dtype(dtype: Any) -> np.dtype | None:
    """A numpy dtype (bfloat16 through ml_dtypes) from a dtype, a jnp dtype or a name such as ``"bf16"``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").removeprefix("jnp.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}")
        return np.dtype(_DTYPE_NAMES[name])
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ValueError(f"not a numpy-compatible dtype: {dtype!r}") from None


def flax_param_table(config: AutoencoderKLConfig) -> dict[str, ParamRule]:
    """``{canonical key: ParamRule}`` for every tensor of the model described by ``config``."""
    return {key: _rule(key, shape) for key, shape in state_dict_shapes(config).items()}


def flax_param_shapes(config: AutoencoderKLConfig) -> dict[FlaxPath, Shape]:
    """Every leaf of the Flax parameter tree with its shape."""
    return {rule.path: rule.shape for rule in flax_param_table(config).values()}


def flax_module_path(module: str) -> FlaxPath:
    """The Flax tree path of a canonical module path: ``decoder.up_blocks.0.resnets.1.conv1`` ->
    ``("decoder", "up_blocks_0", "resnets_1", "conv1")``, ``...attentions.0.to_out.0`` -> ``(..., "proj_attn")``."""
    for old, new in _ATTENTION_NAMES.items():
        module = module.replace(f".{old}.", f".{new}.")
        if module.endswith(f".{old}"):
            module = module[:-len(old)] + new
    parts = module.split(".")
    path: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in _LIST_MODULES and i + 1 < len(parts) and parts[i + 1].isdigit():
            path.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    return tuple(path)


def _rule(key: str, shape: Shape) -> ParamRule:
    module, leaf = key.rsplit(".", 1)
    path = flax_module_path(module)
    if key in BATCH_NORM_KEYS:
        return ParamRule(path + (leaf,), "buffer", tuple(shape))
    if leaf == "bias":
        kind = "bias"
    elif len(shape) == 4:
        kind = "conv"
    elif len(shape) == 2:
        kind = "linear"
    elif len(shape) == 1:
        kind = "scale"
    else:  # the layout table only produces the ranks above
        raise WeightsError(f"{key}: no Flax rule for a weight of shape {shape}")
    perm = _PERMUTATIONS[kind]
    flax_shape = tuple(shape[p] for p in perm) if perm else tuple(shape)
    name = {"conv": "kernel", "linear": "kernel", "scale": "scale", "bias": "bias"}[kind]
    return ParamRule(path + (name,), kind, flax_shape)


# ---------------------------------------------------------------------- canonical -> Flax
def canonical_to_flax(state_dict: Mapping[str, Any], config: AutoencoderKLConfig, *, dtype: Any = None,
                      source: str = "state_dict") -> dict[str, Any]:
    """The Flax ``params`` tree (nested dicts of numpy arrays) for a canonical state_dict.

    Old diffusers attention names (``query``/``key``/``value``/``proj_attn``) are accepted and renamed. Keys and
    shapes must match ``config`` exactly. ``dtype=None`` keeps each tensor's dtype (fp16 and bf16 included);
    otherwise every tensor is cast to ``dtype`` (fp16/bf16 -> fp32 is exact).
    """
    arrays = {k: to_numpy(v, k, source, integers=k in BATCH_NORM_KEYS) for k, v in state_dict.items()}
    renames = rename_legacy_attention_keys(list(arrays))
    if renames:
        arrays = {renames.get(k, k): v for k, v in arrays.items()}
    check_shapes(state_dict_shapes(config), {k: v.shape for k, v in arrays.items()}, source)
    target = as_numpy_dtype(dtype)
    tree: dict[str, Any] = {}
    for key, rule in flax_param_table(config).items():
        value = _cast(arrays[key], target, key, source)
        perm = _PERMUTATIONS[rule.kind]
        _insert(tree, rule.path, np.ascontiguousarray(value.transpose(perm)) if perm else value.copy())
    return tree


# ---------------------------------------------------------------------- Flax -> canonical
def flax_to_canonical(params: Mapping[str, Any], config: AutoencoderKLConfig, *, dtype: Any = None,
                      source: str = "params") -> dict[str, np.ndarray]:
    """The canonical state_dict (numpy arrays, in the model's key order) for a Flax ``params`` tree.

    ``params`` may be the tree itself or ``{"params": tree}`` as ``Module.init`` returns it; jax arrays are
    fetched to host. Paths and shapes must match ``config`` exactly; errors name paths as ``a/b/kernel``.
    """
    flat = flatten_tree(_unwrap(params))
    table = flax_param_table(config)
    expected = {rule.key: rule.shape for rule in table.values()}
    found = {"/".join(path): tuple(np.shape(v)) for path, v in flat.items()}
    check_shapes(expected, found, source)
    target = as_numpy_dtype(dtype)
    out: dict[str, np.ndarray] = {}
    for key, rule in table.items():
        value = _cast(to_numpy(flat[rule.path], rule.key, source, integers=rule.kind == "buffer"), target,
                      rule.key, source)
        if value.dtype.kind in "iu":  # a counter (num_batches_tracked): torch keeps it as int64
            value = value.astype(np.int64)
        perm = _INVERSE[rule.kind]
        out[key] = np.ascontiguousarray(value.transpose(perm)) if perm else value.copy()
    return out


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise WeightsError(f"expected a parameter tree (a mapping), got {type(params).__name__}")
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        return params["params"]
    return params


# ---------------------------------------------------------------------- trees and arrays
def flatten_tree(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
    """``{("encoder", "conv_in", "kernel"): leaf, ...}`` from nested mappings (dicts, FrozenDicts)."""
    flat: dict[FlaxPath, Any] = {}
    for name, value in tree.items():
        path = prefix + (str(name),)
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def unflatten_tree(flat: Mapping[FlaxPath, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_tree`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        _insert(tree, path, value)
    return tree


def _insert(tree: dict[str, Any], path: FlaxPath, value: Any) -> None:
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value


def to_numpy(value: Any, key: str = "tensor", source: str = "state_dict", integers: bool = False) -> np.ndarray:
    """A host numpy array from a numpy/jax array or a torch tensor (bf16 kept as ml_dtypes.bfloat16);
    ``integers`` admits integer arrays (counters such as ``bn.num_batches_tracked``)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bf16: widen exactly, then narrow exactly
            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        value = tensor.numpy()
    try:
        array = np.asarray(value)
    except Exception as e:
        raise WeightsError(f"{source}: {key}: cannot read as an array ({type(e).__name__}: {e})") from None
    if integers and array.dtype.kind in "iu":
        return array
    if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
        raise WeightsError(f"{source}: {key}: expected floating-point weights, found dtype {array.dtype}")
    return array


def _cast(array: np.ndarray, dtype: np.dtype | None, key: str, source: str) -> np.ndarray:
    if dtype is None or array.dtype == dtype or array.dtype.kind in "iu":  # counters keep their integer type
        return array
    if dtype.kind != "f" and dtype != ml_dtypes.bfloat16:
        raise WeightsError(f"{source}: {key}: cannot cast weights to non-float dtype {dtype}")
    return array.astype(dtype)
