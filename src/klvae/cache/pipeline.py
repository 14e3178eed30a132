"""The caching loop: each rank takes a disjoint slice of the dataset, loads images in parallel threads, batches
them by bucket, encodes, and writes shards; then one merged index is written.

Resumability comes from :mod:`klvae.cache.shards`: an image is done exactly when a complete shard lists it, so
a restarted run (any number of ranks) skips what any shard holds and encodes the rest; nothing else is state.
Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) ranks take every ``WORLD_SIZE``-th sample of the sorted list
and meet twice in a gloo process group: after rank 0 has set up the folder, and before it merges the index.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from klvae.cache import shards as sh
from klvae.cache.buckets import Placement, load_into_bucket, make_buckets
from klvae.cache.sources import Sample, list_samples
from klvae.cache.settings import CacheSettings
from klvae.errors import KLVAEError

SAVE_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclasses.dataclass
class Summary:
    images: int            # rows in the merged index
    encoded: int           # images encoded by this run, all ranks
    skipped: int           # images already in shards when this run started
    failed: int            # unreadable images (listed in failed.jsonl)
    shards: int            # shards written by this run, all ranks


@dataclasses.dataclass
class _Loaded:
    sample: Sample
    array: np.ndarray | None = None       # (C, H, W) in [-1, 1]
    placement: Placement | None = None
    source_size: tuple[int, int] = (0, 0)
    error: str = ""


class _Group:
    """Coordination of the ranks started by torchrun (a gloo group); a no-op for one process."""

    def __init__(self, timeout_s: float):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.dist = None
        if self.world > 1:
            import datetime

            try:
                import torch.distributed as dist
            except ImportError:
                raise KLVAEError("running on several ranks needs torch (torch.distributed)") from None
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            self.dist = dist

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank is ok (a barrier too)."""
        return self.total(0 if ok else 1) == 0

    def total(self, value: int) -> int:
        if self.dist is None:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.int64)
        self.dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def manifest(settings: CacheSettings, runner: Any, buckets: list[tuple[int, int]]) -> dict[str, Any]:
    """What a restart must agree with: the model and everything that changes the stored latents."""

    return {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION, "model": runner.source.name,
            "backend": runner.backend, "dtype": runner.dtype, "config": runner.config.to_dict(),
            "resolution": settings.resolution, "aspect_buckets": settings.aspect_buckets,
            "buckets": [list(b) for b in buckets], "flip": settings.flip, "moments": settings.moments,
            "scaled": settings.scaled, "scaling": runner.scaling.to_dict(), "save_dtype": settings.save_dtype,
            "posterior": "mode"}


def run_cache(settings: CacheSettings, runner: Any) -> Summary:
    """Cache ``settings.dataset`` into ``settings.out_dir`` with ``runner`` (see :mod:`klvae.cli.common`)."""
    _check(settings, runner)
    buckets = make_buckets(settings.resolution, settings.bucket_step, settings.max_aspect, settings.aspect_buckets)
    group = _Group(settings.dist_timeout_s)
    try:
        return _run(settings, runner, buckets, group)
    finally:
        group.close()


def _check(settings: CacheSettings, runner: Any) -> None:
    f = runner.pixel_multiple(settings.scaled)
    if settings.bucket_step % f:
        raise KLVAEError(f"--bucket-step {settings.bucket_step} must be a multiple of the model's factor {f}")
    for name in ("batch_size", "shard_size", "workers"):
        if getattr(settings, name) < 1:
            raise KLVAEError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.save_dtype not in SAVE_DTYPES:
        raise KLVAEError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {settings.save_dtype!r}")


def _run(settings: CacheSettings, runner: Any, buckets: list[tuple[int, int]], group: _Group) -> Summary:
    out = settings.out_dir
    samples = list_samples(list(settings.dataset))
    want = manifest(settings, runner, buckets)
    error: Exception | None = None
    if group.rank == 0:  # set up alone: nobody else writes yet
        try:
            if settings.force:
                sh.remove_cache(out)
            sh.check_or_write_manifest(out, want)
            sh.remove_temporaries(out)
            sh.scan_shards(out, quarantine=True)
        except (KLVAEError, OSError) as e:
            error = e
    if not group.all_ok(error is None):
        raise error or KLVAEError("rank 0 could not set up the cache folder (see its message)")
    if group.rank != 0:
        sh.check_or_write_manifest(out, want)

    done = {row["id"] for rows in sh.scan_shards(out).values() for row in rows}
    mine = [s for i, s in enumerate(samples) if i % group.world == group.rank and s.id not in done]
    writer = _ShardWriter(out, group.rank, runner, settings)
    failures: list[dict[str, str]] = []
    error = None
    try:
        _encode_all(mine, buckets, runner, settings, writer, failures, show=group.rank == 0)
        sh.write_failures(out, group.rank, failures)
    except (KLVAEError, OSError) as e:
        error = e
    if not group.all_ok(error is None):  # everyone waits here for the slowest rank
        raise error or KLVAEError("another rank failed (see its message)")
    encoded, written, failed = (group.total(v) for v in (writer.images, writer.shards, len(failures)))
    images = 0
    if group.rank == 0:
        images, failed = sh.merge_index(out)
    group.all_ok(True)  # the index is written before any rank returns
    return Summary(images=images, encoded=encoded, skipped=len(done), failed=failed, shards=written)


def _encode_all(mine: list[Sample], buckets, runner, settings: CacheSettings, writer: _ShardWriter,
                failures: list[dict[str, str]], show: bool) -> None:
    from klvae.progress import progress

    pending: dict[tuple[int, int], list[_Loaded]] = {}
    loaded = _load_parallel(mine, buckets, runner.config.in_channels, settings.workers)
    for item in progress(loaded, len(mine), "cache", settings.quiet or not show):
        if item.error:
            if settings.strict:
                raise KLVAEError(f"{item.sample.source}: {item.error} (without --strict it is skipped)")
            failures.append({"id": item.sample.id, "source": item.sample.source, "error": item.error})
            continue
        group = pending.setdefault(item.placement.bucket, [])
        group.append(item)
        if len(group) >= settings.batch_size:
            writer.add(pending.pop(item.placement.bucket))
    for group in pending.values():
        writer.add(group)
    writer.flush()
    if failures and not settings.quiet:
        print(f"klvae: warning: {len(failures)} image(s) could not be read and were skipped, e.g. "
              f"{failures[0]['source']}: {failures[0]['error']}", file=sys.stderr)


def _load_one(sample: Sample, buckets, channels: int) -> _Loaded:
    try:
        data = io.BytesIO(sample.read_bytes()) if sample.offset >= 0 else sample.path
        array, placement, size = load_into_bucket(data, buckets, channels, sample.source)
        return _Loaded(sample, array, placement, size)
    except Exception as e:  # noqa: BLE001 - any decoder error makes this one image unreadable
        return _Loaded(sample, error=f"{type(e).__name__}: {e}")


def _load_parallel(samples: list[Sample], buckets, channels: int, workers: int) -> Iterator[_Loaded]:
    """Loaded samples in order, decoded by ``workers`` threads a bounded distance ahead (Pillow releases the GIL
    while decoding and resizing)."""
    if workers == 1:
        yield from (_load_one(s, buckets, channels) for s in samples)
        return
    ahead = 4 * workers
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="klvae-load") as pool:
        futures = [pool.submit(_load_one, s, buckets, channels) for s in samples[:ahead]]
        for i in range(len(samples)):
            if i + ahead < len(samples):
                futures.append(pool.submit(_load_one, samples[i + ahead], buckets, channels))
            yield futures[i].result()
            futures[i] = None  # let the pixels go


class _ShardWriter:
    """Encodes batches and collects their latents into shards of ``shard_size`` images."""

    def __init__(self, out_dir: str, rank: int, runner: Any, settings: CacheSettings):
        from klvae.latentfile import latent_metadata

        self.out_dir, self.rank, self.runner, self.settings = out_dir, rank, runner, settings
        self.seq = sh.next_sequence(out_dir, rank)
        self.meta = latent_metadata(runner, settings.scaled)
        self.tensors: dict[str, np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self.images = 0
        self.shards = 0
        self.dtype = SAVE_DTYPES[settings.save_dtype]

    def _latents(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = self.runner.encode(x)
        if not self.settings.scaled:
            return mean, logvar
        scaling = self.runner.scaling  # scaled latents come with their log-variance in the same space
        return scaling.scale(mean), scaling.scale_logvar(logvar)

    def add(self, batch: list[_Loaded]) -> None:
        x = np.stack([item.array for item in batch])
        z, logvar = self._latents(x)
        zf = self._latents(np.ascontiguousarray(x[..., ::-1]))[0] if self.settings.flip else None
        for i, item in enumerate(batch):
            sid, p = item.sample.id, item.placement
            row = {"id": sid, "source": item.sample.source, "source_size": list(item.source_size),
                   "resized": list(p.resized), "crop": [p.crop[0], p.crop[1], p.bucket[0], p.bucket[1]],
                   "bucket": list(p.bucket), "latent_shape": list(z.shape[1:]), "key": sh.latent_key(sid)}
            self.tensors[row["key"]] = z[i].astype(self.dtype)
            if zf is not None:
                row["flip_key"] = sh.flip_key(sid)
                self.tensors[row["flip_key"]] = zf[i].astype(self.dtype)
            if self.settings.moments:
                row["logvar_key"] = f"logvar/{sid}"
                self.tensors[row["logvar_key"]] = logvar[i].astype(self.dtype)
            self.rows.append(row)
        if len(self.rows) >= self.settings.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        path = os.path.join(self.out_dir, sh.SHARD_DIR, sh.shard_name(self.rank, self.seq))
        sh.write_shard(path, self.tensors, self.meta, self.rows)
        self.images += len(self.rows)
        self.shards += 1
        self.seq += 1
        self.tensors, self.rows = {}, []
