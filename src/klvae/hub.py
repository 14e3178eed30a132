"""Finding a pretrained model: a local diffusers folder, or a hub repo id through huggingface_hub.

No network access happens unless ``path_or_repo_id`` is not a local folder; huggingface_hub's offline mode
(``HF_HUB_OFFLINE=1``) and ``local_files_only`` are honoured, and the local cache is used when it has the files.
"""

from __future__ import annotations

import os

from klvae.config import CONFIG_NAME
from klvae.errors import WeightsError
from klvae.weights.files import INDEX_SUFFIX, find_weights_file, shard_files, weights_candidates


def resolve_pretrained(path_or_repo_id: str | os.PathLike, *, subfolder: str | None = None,
                       variant: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                       revision: str | None = None, token: str | bool | None = None) -> tuple[str, str]:
    """Return ``(config_path, weights_path)`` for a diffusers-layout model, downloading only if needed.

    ``weights_path`` may be a shard index (``*.index.json``) whose shards lie beside it.
    """
    root = os.fspath(path_or_repo_id)
    folder = os.path.join(root, subfolder) if subfolder else root
    if os.path.isdir(folder):
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise WeightsError(f"{folder}: no {CONFIG_NAME} in this folder")
        return config_path, find_weights_file(folder, variant)
    if os.path.isdir(root) or os.path.sep in root and not _looks_like_repo_id(root):
        raise WeightsError(f"{folder}: no such folder")
    return _download(root, subfolder, variant, cache_dir, local_files_only, revision, token)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def _download(repo_id: str, subfolder: str | None, variant: str | None, cache_dir: str | None,
              local_files_only: bool, revision: str | None, token: str | bool | None) -> tuple[str, str]:
    try:
        import huggingface_hub as hf
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise WeightsError(f"{repo_id!r} is not a local folder, and loading from the hub needs huggingface_hub "
                           "(pip install 'klvae[hub]')") from None

    def fetch(filename: str) -> str:
        return hf.hf_hub_download(repo_id, filename, subfolder=subfolder or None, revision=revision,
                                  cache_dir=cache_dir, local_files_only=local_files_only, token=token)

    where = f"{repo_id}" + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        config_path = fetch(CONFIG_NAME)
    except LocalEntryNotFoundError:
        raise WeightsError(f"{where}: not a local folder and not in the hub cache (offline mode or "
                           "local_files_only is on, or the hub cannot be reached)") from None
    except Exception as e:  # repository not found, gated, revision unknown, ...
        raise WeightsError(f"{where}: cannot fetch {CONFIG_NAME} ({type(e).__name__}: {e})") from None
    for name in weights_candidates(variant):
        try:
            path = fetch(name)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except Exception as e:
            if "404" in str(e) or "Entry Not Found" in str(e):
                continue
            raise WeightsError(f"{where}: cannot fetch {name} ({type(e).__name__}: {e})") from None
        if name.endswith(INDEX_SUFFIX):
            for shard in _shard_names(path):
                fetch(shard)
            shard_files(path)
        return config_path, path
    raise WeightsError(f"{where}: no weights file found (looked for {', '.join(weights_candidates(variant))})")


def _shard_names(index_path: str) -> list[str]:
    import json

    with open(index_path, encoding="utf-8") as f:
        return sorted(set(json.load(f)["weight_map"].values()))
