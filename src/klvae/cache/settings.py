"""The options of a cache run (no numpy, no torch: the command line imports this to build its parser)."""

from __future__ import annotations

import dataclasses

SAVE_DTYPE_NAMES = ("fp32", "fp16")


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    dataset: tuple[str, ...]
    out_dir: str
    resolution: int = 512          # buckets hold about resolution**2 pixels
    bucket_step: int = 64          # bucket sides are multiples of this (and of the model's factor)
    max_aspect: float = 2.0
    aspect_buckets: bool = True    # False: one square bucket (centre crop)
    flip: bool = False             # also store the latents of the horizontally flipped image
    moments: bool = False          # also store the posterior's log-variance (to sample at training time)
    scaled: bool = False           # apply the model's latent scaling
    save_dtype: str = "fp32"
    batch_size: int = 8
    shard_size: int = 1000         # images per shard
    workers: int = 4               # loader threads
    strict: bool = False           # an unreadable image stops the run (default: skipped and listed)
    force: bool = False            # start over in a folder that holds a different cache
    quiet: bool = False
    dist_timeout_s: float = 7 * 24 * 3600.0
