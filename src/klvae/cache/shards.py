"""The cache on disk: shard files, the manifest, the done-set a restart skips, and the merged index.

Layout of OUT_DIR::

    cache.json                  manifest: settings and model; a restart must match it
    shards/RRRRR-NNNNNN.safetensors   latents of many images, written by rank RRRRR, sequence NNNNNN
    failed/RRRRR.jsonl          images rank RRRRR could not read (retried by the next run)
    index.jsonl                 one row per image, sorted by id: id, source_size, resized, crop, bucket,
                                shard, key (and flip_key); written once every rank has finished

A shard holds tensors ``latents/<id>`` (and ``flip/<id>``) shaped (c, h, w), plus metadata: ``klvae_latents``
(model, scaling) and ``klvae_rows`` (the index rows of its images). Shards are the only record of progress:
each is written to a temporary name, flushed to disk and renamed, so a reader (or a restart) sees a shard
completely or not at all, and an image is done exactly when a shard lists it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import numpy as np

from klvae.errors import KLVAEError
from klvae.fileio import atomic_path, atomic_write_bytes

MANIFEST = "cache.json"
INDEX = "index.jsonl"
FAILED = "failed.jsonl"
SHARD_DIR = "shards"
FAILED_DIR = "failed"
CORRUPT_DIR = "corrupt"
ROWS_KEY = "klvae_rows"
FORMAT = "klvae-latent-cache"
FORMAT_VERSION = 1
_SHARD_NAME = re.compile(r"^(\d{5})-(\d{6})\.safetensors$")


class CacheError(KLVAEError):
    """The output folder holds a cache made differently, or the cache's files disagree."""


def latent_key(sample_id: str) -> str:
    return f"latents/{sample_id}"


def flip_key(sample_id: str) -> str:
    return f"flip/{sample_id}"


def shard_name(rank: int, seq: int) -> str:
    return f"{rank:05d}-{seq:06d}.safetensors"


# ---------------------------------------------------------------------------------------------- manifest
def check_or_write_manifest(out_dir: str, manifest: dict[str, Any]) -> bool:
    """Write the manifest of a new cache; for an existing one, check it was made the same way.
    Returns True when the cache already existed."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{path}: unreadable manifest ({e}); remove {out_dir} or pass --force") from None
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise CacheError(f"{out_dir}: holds a cache made with different {', '.join(diff)}; use another output "
                             "folder, or --force to start over")
        return True
    if os.path.isdir(out_dir) and _foreign_entries(out_dir):
        raise CacheError(f"{out_dir}: exists and is not a latent cache (no {MANIFEST}); use an empty or new folder")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return False


def _foreign_entries(out_dir: str) -> list[str]:
    ours = {MANIFEST, INDEX, FAILED, SHARD_DIR, FAILED_DIR}
    return [n for n in os.listdir(out_dir) if n not in ours]


def remove_cache(out_dir: str) -> None:
    """Delete what a cache consists of (and nothing else) from ``out_dir``: ``--force`` starts over."""
    import shutil

    if not os.path.isdir(out_dir):
        return
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)) and _foreign_entries(out_dir):
        raise CacheError(f"{out_dir}: exists and is not a latent cache (no {MANIFEST}); refusing to delete it")
    for name in (MANIFEST, INDEX, FAILED):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            os.remove(p)
    for name in (SHARD_DIR, FAILED_DIR):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- shards
def write_shard(path: str, tensors: dict[str, np.ndarray], latents_meta: dict[str, Any],
                rows: list[dict[str, Any]]) -> None:
    """Write one shard atomically and durably (flushed to disk before it appears under its name)."""
    from safetensors.numpy import save_file

    from klvae.latentfile import METADATA_KEY

    header = {"format": "np", METADATA_KEY: json.dumps(latents_meta, sort_keys=True),
              ROWS_KEY: json.dumps(rows, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_shard_rows(path: str) -> list[dict[str, Any]]:
    """The index rows a shard lists, after checking its header and that every listed tensor is there."""
    from klvae.weights.files import read_safetensors_header, safetensors_metadata

    header = read_safetensors_header(path)  # raises for truncated or corrupt files
    try:
        rows = json.loads(safetensors_metadata(path)[ROWS_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: shard without a valid {ROWS_KEY} entry ({e})") from None
    for row in rows:
        for key in (row["key"], row.get("flip_key"), row.get("logvar_key")):
            if key is not None and key not in header:
                raise CacheError(f"{path}: lists {row['id']!r} but has no tensor {key!r}")
    return rows


def scan_shards(out_dir: str, quarantine: bool = False) -> dict[str, list[dict[str, Any]]]:
    """``{shard file name: rows}`` for every complete shard. A shard that cannot be read is an error, or with
    ``quarantine`` is moved to ``shards/corrupt/`` (its images count as not done) with a warning."""
    folder = os.path.join(out_dir, SHARD_DIR)
    found: dict[str, list[dict[str, Any]]] = {}
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        if not _SHARD_NAME.match(name):
            continue
        path = os.path.join(folder, name)
        try:
            found[name] = read_shard_rows(path)
        except KLVAEError as e:
            if not quarantine:
                raise
            os.makedirs(os.path.join(folder, CORRUPT_DIR), exist_ok=True)
            os.replace(path, os.path.join(folder, CORRUPT_DIR, name))
            warnings.warn(f"moved unreadable shard aside, its images will be encoded again: {e}", stacklevel=2)
    return found


def next_sequence(out_dir: str, rank: int) -> int:
    """The next unused shard sequence number of ``rank``."""
    folder = os.path.join(out_dir, SHARD_DIR)
    seqs = [int(m.group(2)) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
            for m in [_SHARD_NAME.match(n)] if m and int(m.group(1)) == rank]
    corrupt = os.path.join(folder, CORRUPT_DIR)
    seqs += [int(m.group(2)) for n in (os.listdir(corrupt) if os.path.isdir(corrupt) else [])
             for m in [_SHARD_NAME.match(n)] if m and int(m.group(1)) == rank]
    return max(seqs, default=-1) + 1


def remove_temporaries(out_dir: str) -> int:
    """Delete temporary files a killed run left behind (run before any writer starts); returns how many."""
    removed = 0
    for sub in (SHARD_DIR, FAILED_DIR, ""):
        folder = os.path.join(out_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- failures
def write_failures(out_dir: str, rank: int, failures: list[dict[str, str]]) -> None:
    path = os.path.join(out_dir, FAILED_DIR, f"{rank:05d}.jsonl")
    if not failures:
        if os.path.exists(path):
            os.remove(path)
        return
    atomic_write_bytes(path, "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode())


def read_failures(out_dir: str) -> list[dict[str, str]]:
    folder = os.path.join(out_dir, FAILED_DIR)
    out: list[dict[str, str]] = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".jsonl") and not name.startswith("."):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out += [json.loads(line) for line in f if line.strip()]
    return out


# ---------------------------------------------------------------------------------------------- index
def merge_index(out_dir: str) -> tuple[int, int]:
    """Write ``index.jsonl`` (and ``failed.jsonl``) from every shard; returns (images, failures).

    Every id must appear in exactly one shard; a duplicate is an error naming both shards.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name, shard_rows in scan_shards(out_dir).items():
        for row in shard_rows:
            if row["id"] in rows:
                raise CacheError(f"{out_dir}: image {row['id']!r} is in two shards, {rows[row['id']]['shard']} and "
                                 f"{SHARD_DIR}/{name}; delete one of them and run the cache again")
            rows[row["id"]] = {**row, "shard": f"{SHARD_DIR}/{name}"}
    failures = [f for f in read_failures(out_dir) if f["id"] not in rows]
    text = "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows))
    atomic_write_bytes(os.path.join(out_dir, INDEX), text.encode())
    failed_path = os.path.join(out_dir, FAILED)
    if failures:
        atomic_write_bytes(failed_path, "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode())
    elif os.path.exists(failed_path):
        os.remove(failed_path)
    return len(rows), len(failures)


def read_index(out_dir: str) -> list[dict[str, Any]]:
    """The rows of a finished cache's index."""
    path = os.path.join(out_dir, INDEX)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
