"""Weight files on disk: diffusers' folder naming, and safetensors headers read without loading tensors."""

from __future__ import annotations

import json
import os
import struct

from klvae.errors import WeightsError

WEIGHTS_STEM = "diffusion_pytorch_model"
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIX = ".bin"
INDEX_SUFFIX = ".index.json"
# A safetensors header larger than this is certainly corrupt (real VAE headers are ~30 KB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def weights_name(variant: str | None = None, safe: bool = True) -> str:
    """``diffusion_pytorch_model[.variant].safetensors`` (or ``.bin`` when ``safe`` is false)."""
    stem = WEIGHTS_STEM + (f".{variant}" if variant else "")
    return stem + (SAFETENSORS_SUFFIX if safe else PICKLE_SUFFIX)


def weights_candidates(variant: str | None = None) -> list[str]:
    """File names to look for, best first: safetensors, sharded safetensors, then legacy pickles."""
    names = []
    for safe in (True, False):
        single = weights_name(variant, safe)
        names += [single, single + INDEX_SUFFIX]
    return names


def find_weights_file(folder: str, variant: str | None = None) -> str:
    """The weights file (or shard index) of a diffusers model folder."""
    for name in weights_candidates(variant):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    wanted = ", ".join(weights_candidates(variant))
    raise WeightsError(f"{folder}: no weights file found (looked for {wanted}; the folder holds: "
                       f"{', '.join(present) or 'nothing'})")


def shard_files(index_path: str) -> list[str]:
    """The shard files a ``*.index.json`` names, as paths beside it, each checked to exist."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path}: not a valid shard index ({e})") from None
    folder = os.path.dirname(index_path)
    names = sorted(set(weight_map.values()))
    for name in names:
        if os.path.basename(name) != name:
            raise WeightsError(f"{index_path}: shard name {name!r} must be a plain file name")
        if not os.path.isfile(os.path.join(folder, name)):
            raise WeightsError(f"{index_path}: shard {name} is missing")
    return [os.path.join(folder, n) for n in names]


def read_safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` from a safetensors file's header, checked against the file's size.

    Reads only the header, so it is cheap on multi-GB checkpoints; raises :class:`WeightsError` naming the file
    for empty, truncated or corrupt files.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise WeightsError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a file "
                                   f"of {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        if not 0 <= start <= end <= data_size:
            raise WeightsError(f"{path}: truncated safetensors file: tensor {key!r} ends at byte {end} of "
                               f"{data_size} data bytes")
        out[key] = (dtype, shape)
    return out


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when absent)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_weights(path: str, framework: str, load_pickle) -> dict:
    """All tensors of a safetensors file or shard index, read as ``framework`` ("torch" or "numpy") tensors.

    Any other file is handed to ``load_pickle(path)`` (each backend's weights-only reader of legacy ``.bin``).
    """
    if path.endswith(INDEX_SUFFIX):
        tensors: dict = {}
        for shard in shard_files(path):
            tensors.update(load_weights(shard, framework, load_pickle))
        return tensors
    if not path.endswith(SAFETENSORS_SUFFIX):
        return load_pickle(path)
    import importlib

    load_file = importlib.import_module(f"safetensors.{framework}").load_file
    read_safetensors_header(path)  # typed errors for empty, truncated or corrupt files
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own errors carry no file name
        raise WeightsError(f"{path}: cannot read safetensors file ({e})") from None
