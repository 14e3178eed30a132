"""Reading the VAE out of a single-file checkpoint: a bare VAE file or a full model with the VAE inside.

``read_single_file(path)`` returns the config and the canonical (diffusers-layout) state dict, for either
backend (``framework="pt"`` gives torch tensors, ``"numpy"`` numpy arrays). Safetensors files are read
lazily: only the VAE's tensors are loaded, however large the file. ``.ckpt``/``.pt``/``.pth``/``.bin`` pickles
go through ``torch.load(weights_only=True)``, memory-mapped where the format allows: no pickled code runs.
torch is imported only for pickles and for ``framework="pt"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

from klvae.config import AutoencoderKLConfig, config_from_dict
from klvae.errors import ConfigError, WeightsError
from klvae.weights.files import read_safetensors_header, safetensors_metadata
from klvae.weights.infer import EDM_KEYS, detect_family, infer_config
from klvae.weights.layout import Shape, check_shapes, rename_legacy_attention_keys, state_dict_shapes
from klvae.weights.original import (TRAINING_ONLY_PREFIXES, VAE_PREFIXES, detect_layout, has_batch_norm,
                                    is_attention_projection, original_key_map)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Safetensors metadata key under which save_single_file stores the full config (latent factors included).
CONFIG_METADATA_KEY = "klvae_config"
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")
FRAMEWORKS = ("pt", "numpy")


@dataclasses.dataclass
class SingleFileWeights:
    """The VAE found in a single file."""

    config: AutoencoderKLConfig
    state_dict: dict[str, Any]  # canonical (diffusers) keys and shapes
    source: str
    layout: str  # "original" or "diffusers": the layout the file used
    prefix: str  # "" for a bare VAE file, else "first_stage_model." or "vae."
    ignored: tuple[str, ...] = ()  # training-only keys skipped (LPIPS/discriminator, EMA state)


# ---------------------------------------------------------------------- the file itself
class _Checkpoint:
    """Key names and shapes of a weights file, and loading of chosen tensors."""

    path: str
    shapes: dict[str, Shape]
    metadata: dict[str, str]

    def load(self, keys: list[str], framework: str) -> dict[str, Any]:
        raise NotImplementedError


class _Safetensors(_Checkpoint):
    def __init__(self, path: str):
        self.path = path
        self.shapes = {k: shape for k, (_, shape) in read_safetensors_header(path).items()}
        self.metadata = safetensors_metadata(path)

    def load(self, keys: list[str], framework: str) -> dict[str, Any]:
        from safetensors import safe_open

        try:
            try:  # pread: tensors own their memory instead of staying backed by the file's map (safetensors>=0.8)
                handle = safe_open(self.path, framework=framework, backend="pread")
            except TypeError:  # older safetensors copy out of the map anyway
                handle = safe_open(self.path, framework=framework)
            with handle as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # safetensors' own errors name no file
            raise WeightsError(f"{self.path}: cannot read safetensors tensors ({type(e).__name__}: {e})") from None


class _Pickle(_Checkpoint):
    def __init__(self, path: str):
        import torch

        self.path = path
        self.metadata = {}
        try:
            # mmap: a tensor's bytes are read only when it is used; needs torch's zip format.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:
            raise WeightsError(_pickle_error(path, e)) from None
        while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{path}: expected a dict of tensors (or one under 'state_dict'), found "
                               f"{type(obj).__name__}")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def load(self, keys: list[str], framework: str) -> dict[str, Any]:
        # clone: copy only these tensors out of the memory map
        out = {k: self._tensors[k].detach().clone() for k in keys}
        return out if framework == "pt" else {k: _torch_to_numpy(v) for k, v in out.items()}


def _pickle_error(path: str, e: Exception) -> str:
    text = str(e)
    if "weights only" in text.lower() or "Unsupported global" in text or "unpickl" in type(e).__name__.lower():
        first = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
        return (f"{path}: refused to unpickle: the file holds Python objects other than tensors, which could run "
                f"code when loaded, so it was not loaded (only weights-only pickles are read). {first}").strip()
    return f"{path}: cannot read as a PyTorch weights file ({type(e).__name__}: {text.splitlines()[0] if text else ''})"


def _torch_to_numpy(t: Any) -> Any:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)  # bf16 -> f32 -> bf16 is exact
    return t.numpy()


def open_checkpoint(path: str) -> _Checkpoint:
    """The reader for ``path``, chosen by its first bytes (safetensors or a torch pickle), not its name."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise WeightsError(f"{path}: empty file (0 bytes)")
    is_safetensors = path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{")
    if is_safetensors:
        return _Safetensors(path)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip archive, or a pickle
        raise WeightsError(f"{path}: unknown file format: neither safetensors nor a PyTorch checkpoint (the file "
                           f"starts with {head[:8]!r})")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise WeightsError(f"{path}: reading PyTorch pickles needs torch; convert the file to safetensors") from None
    return _Pickle(path)


# ---------------------------------------------------------------------- finding the VAE
def select_vae_keys(keys: list[str], source: str) -> tuple[str, dict[str, str], list[str], list[str]]:
    """``(prefix, {vae_key: file_key}, ignored, others)``: the VAE's keys with the prefix stripped, the
    training-only keys skipped, and the keys outside the VAE (the rest of a full checkpoint)."""
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p + "encoder.") for k in keys)), "")
    if prefix:
        inside = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        others = [k for k in keys if not k.startswith(prefix)]
    else:
        inside = {k: k for k in keys if k.startswith(_VAE_ROOTS + TRAINING_ONLY_PREFIXES)}
        others = [k for k in keys if k not in inside]
    ignored = [inside.pop(k) for k in list(inside) if k.startswith(TRAINING_ONLY_PREFIXES)]
    if not any(k.startswith(("encoder.", "decoder.")) for k in inside):
        raise WeightsError(f"{source}: no VAE weights in this file: {_describe(keys)}. A VAE has keys such as "
                           "encoder.conv_in.weight, bare or under first_stage_model. or vae.")
    if not prefix and others:
        raise WeightsError(f"{source}: unknown layout: besides VAE weights the file has {len(others)} other keys "
                           f"({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}) and none under "
                           f"{' or '.join(VAE_PREFIXES)}")
    return prefix, inside, ignored, others


def _describe(keys: list[str]) -> str:
    if not keys:
        return "it holds no tensors"
    family = detect_family(keys)
    kind = f"it looks like a {family} model checkpoint without its VAE" if family else f"{len(keys)} tensors"
    if any(k.startswith("model.diffusion_model.") for k in keys) and not family:
        kind = "it looks like a UNet/transformer-only checkpoint"
    return f"{kind} (keys such as {', '.join(sorted(keys)[:3])})"


def canonical_names(vae_keys: list[str], source: str) -> tuple[str, dict[str, str]]:
    """``(layout, {file_vae_key: diffusers_key})`` for the VAE's keys."""
    layout = detect_layout(vae_keys)
    if layout == "original":
        return layout, original_key_map(vae_keys, source)
    if layout == "diffusers":
        renames = rename_legacy_attention_keys(vae_keys)
        return layout, {k: renames.get(k, k) for k in vae_keys}
    what = "both original and diffusers block names" if layout == "mixed" else "neither original nor diffusers names"
    raise WeightsError(f"{source}: unknown layout: the VAE keys have {what} (e.g. {', '.join(sorted(vae_keys)[:3])})")


def _canonical_shape(diffusers_key: str, shape: Shape) -> Shape:
    if is_attention_projection(diffusers_key) and len(shape) > 2 and all(d == 1 for d in shape[2:]):
        return tuple(shape[:2])
    return tuple(shape)


# ---------------------------------------------------------------------- the whole read
def read_single_file(path: str, config: AutoencoderKLConfig | None = None,
                     framework: str = "pt") -> SingleFileWeights:
    """The VAE of the single file at ``path`` (a local file) as config + canonical state dict.

    ``config`` (already resolved) fixes the architecture and factors; without it a config written by
    ``save_single_file`` into the file's metadata is used, else one is inferred from the key shapes and the
    rest of the checkpoint (see :mod:`klvae.weights.infer`). The weights are checked strictly against it.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    ckpt = open_checkpoint(path)
    prefix, inside, ignored, others = select_vae_keys(list(ckpt.shapes), path)
    layout, names = canonical_names(list(inside), path)
    shapes = {names[k]: _canonical_shape(names[k], ckpt.shapes[inside[k]]) for k in inside}

    if config is None:
        config = _embedded_config(ckpt)
    if config is None:
        edm = _edm_stats(ckpt, others, framework)
        config = infer_config(shapes, family=detect_family(others, ckpt.metadata), edm_stats=edm, source=path)
    else:
        _check_model_class(config, shapes, path)
        check_shapes(state_dict_shapes(config), shapes, path)

    loaded = ckpt.load([inside[k] for k in inside], framework)
    state_dict = {}
    for key in inside:
        new = names[key]
        value = loaded[inside[key]]
        if tuple(value.shape) != shapes[new]:
            value = value.reshape(shapes[new])
        state_dict[new] = value
    return SingleFileWeights(config=config, state_dict=state_dict, source=path, layout=layout, prefix=prefix,
                             ignored=tuple(ignored))


def read_vae(path_or_url: str | os.PathLike, config: Any = None, *, subfolder: str | None = None,
             cache_dir: str | None = None, local_files_only: bool = False, revision: str | None = None,
             token: str | bool | None = None, framework: str = "pt",
             config_class: type[AutoencoderKLConfig] = AutoencoderKLConfig) -> SingleFileWeights:
    """``read_single_file`` for what users pass: a local path or hub file URL, and ``config`` as a config, dict,
    preset name, diffusers folder, ``config.json`` or hub repo id (see :mod:`klvae.weights.sources`); a dict
    without ``_class_name`` is read as ``config_class``."""
    from klvae.weights.sources import resolve_config_arg, resolve_single_file

    path = resolve_single_file(path_or_url, cache_dir=cache_dir, local_files_only=local_files_only,
                               revision=revision, token=token)
    resolved = None if config is None else resolve_config_arg(
        config, subfolder=subfolder, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        config_class=config_class)
    return read_single_file(path, resolved, framework=framework)


def _check_model_class(config: AutoencoderKLConfig, shapes: Mapping[str, Shape], source: str) -> None:
    """A FLUX.2 file (latent statistics ``bn.*``) needs a FLUX.2 config, and only it does."""
    flux2_file, flux2_config = has_batch_norm(shapes), config.latent_patch_size is not None
    if flux2_file and not flux2_config:
        raise WeightsError(f"{source}: this is FLUX.2's VAE (it holds the latent statistics bn.*), but the config "
                           f"given is an {config.class_name} one; load it with klvae.AutoencoderKLFlux2 (config="
                           "'flux2' or none: the architecture is read from the weights)")
    if flux2_config and not flux2_file:
        raise WeightsError(f"{source}: a FLUX.2 config was given, but the file has no FLUX.2 latent statistics "
                           "(bn.*): it is not FLUX.2's VAE; load it with klvae.AutoencoderKL")


def _embedded_config(ckpt: _Checkpoint) -> AutoencoderKLConfig | None:
    text = ckpt.metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return config_from_dict(json.loads(text), source=f"{ckpt.path} (metadata {CONFIG_METADATA_KEY})")
    except (ValueError, ConfigError) as e:
        raise WeightsError(f"{ckpt.path}: corrupt {CONFIG_METADATA_KEY} metadata ({e})") from None


def _edm_stats(ckpt: _Checkpoint, others: list[str], framework: str):
    """Playground v2.5's latent mean/std, stored beside its VAE as ``edm_mean``/``edm_std``."""
    if not all(k in others for k in EDM_KEYS):
        return None
    values = ckpt.load(list(EDM_KEYS), framework)
    return tuple(tuple(float(x) for x in values[k].reshape(-1).tolist()) for k in EDM_KEYS)


def single_file_metadata(config: AutoencoderKLConfig) -> dict[str, str]:
    """Safetensors metadata for an exported file: the format tag and the full config."""
    return {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_diffusers_dict(), sort_keys=True)}
