"""Where single-file weights and their configs come from: local paths, Hugging Face file URLs, hub repo ids.

Downloads go through huggingface_hub and its cache, so a file fetched once is read from the cache afterwards,
and its offline mode (``HF_HUB_OFFLINE=1``) and ``local_files_only`` are honoured. Nothing touches the network
for a local path or a preset name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from klvae.config import (CLASS_NAME, CONFIG_CLASSES, CONFIG_NAME, PRESET_ALIASES, PRESETS, AutoencoderKLConfig,
                          read_config_file, resolve_config)
from klvae.errors import ConfigError, WeightsError

# URL forms accepted for a file on the hub (as diffusers accepts them), with an optional blob/resolve revision.
_URL = re.compile(r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/"
                  r"(?:(?:blob|resolve)/(?P<rev>[^/]+)/)?(?P<file>.+)$")


def parse_hub_url(url: str) -> tuple[str, str, str | None] | None:
    """``(repo_id, filename, revision)`` of a hub file URL, or None if ``url`` is not one."""
    match = _URL.match(url)
    if match is None:
        return None
    return match.group("repo"), match.group("file"), match.group("rev")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError("loading from the hub needs huggingface_hub (pip install 'klvae[hub]')") from None
    return huggingface_hub


def resolve_single_file(path_or_url: str | os.PathLike, *, cache_dir: str | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        token: str | bool | None = None) -> str:
    """A local path for ``path_or_url``: the path itself, or the hub file downloaded into (or found in) the cache."""
    source = os.fspath(path_or_url)
    if os.path.isfile(source):
        return source
    parsed = parse_hub_url(source)
    if parsed is None:
        if os.path.isdir(source):
            raise WeightsError(f"{source}: is a folder, not a single weights file (use from_pretrained for "
                               "diffusers folders)")
        raise WeightsError(f"{source}: no such file (and not a Hugging Face file URL such as "
                           "https://huggingface.co/org/repo/blob/main/model.safetensors)")
    repo_id, filename, url_revision = parsed
    hf = _hub()
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return hf.hf_hub_download(repo_id, filename, revision=revision or url_revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only, token=token)
    except LocalEntryNotFoundError:
        raise WeightsError(f"{source}: not in the hub cache, and offline mode or local_files_only is on (or the "
                           "hub cannot be reached)") from None
    except Exception as e:  # repository or file not found, gated repository, bad revision, ...
        raise WeightsError(f"{source}: cannot fetch {filename} from {repo_id} ({type(e).__name__}: {e})") from None


def resolve_config_arg(config: AutoencoderKLConfig | Mapping[str, Any] | str | os.PathLike, *,
                       subfolder: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                       revision: str | None = None, token: str | bool | None = None,
                       config_class: type[AutoencoderKLConfig] = AutoencoderKLConfig) -> AutoencoderKLConfig:
    """What ``from_single_file(config=...)`` accepts: a config, a dict, a preset name, a diffusers folder or
    ``config.json``, or (as in diffusers) a hub repo id whose ``config.json`` is fetched, from ``subfolder``
    or else from the root or ``vae/``. A dict without ``_class_name`` is read as ``config_class``."""
    if isinstance(config, (str, os.PathLike)):
        name = os.fspath(config)
        local = os.path.join(name, subfolder) if subfolder and os.path.isdir(name) else name
        known_preset = PRESET_ALIASES.get(name.lower(), name.lower()) in PRESETS
        if not os.path.exists(local) and not known_preset and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            return _hub_config(name, subfolder, cache_dir, local_files_only, revision, token)
        return resolve_config(local, cls=config_class, strict=False)
    return resolve_config(config, cls=config_class, strict=False)


def _hub_config(repo_id: str, subfolder: str | None, cache_dir: str | None, local_files_only: bool,
                revision: str | None, token: str | bool | None) -> AutoencoderKLConfig:
    hf = _hub()
    errors = []
    for folder in ([subfolder] if subfolder else [None, "vae"]):
        try:
            path = hf.hf_hub_download(repo_id, CONFIG_NAME, subfolder=folder, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token)
        except Exception as e:
            errors.append(f"{folder or '.'}: {type(e).__name__}")
            continue
        config = read_config_file(path) if _is_vae_config(path) else None
        if config is not None:
            return config
        errors.append(f"{folder or '.'}: not an AutoencoderKL config")
    raise ConfigError(f"config {repo_id!r}: no AutoencoderKL config.json found on the hub or in its cache "
                      f"({'; '.join(errors)})")


def _is_vae_config(path: str) -> bool:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict)
            and str(data.get("_class_name", CLASS_NAME)).removeprefix("Flax") in CONFIG_CLASSES)
