"""``klvae cache DATASET... -o OUT_DIR``: encode an image dataset to latent shards plus an index, once.

DATASET is a folder of images (nested folders; the id of ``cats/001.jpg`` is ``cats/001``), or tar shards in the
webdataset layout (``data/shard-{0000..0099}.tar``, a glob, or a folder of .tar files; the id is the sample
key). Images go into aspect-ratio buckets of about RESOLUTION x RESOLUTION pixels (sides multiples of
--bucket-step), resized to cover and centre-cropped; the index (OUT_DIR/index.jsonl) has one row per image:
id, source, source_size, resized, crop [top, left, height, width], bucket, latent_shape, shard and key (the
tensor name in the shard; flip_key/logvar_key with --flip/--moments). Latents are the posterior's mode.

Killed at any moment and started again with the same command, it resumes: finished shards are kept, nothing
is encoded twice, and no shard is ever partial. Under torchrun each rank caches a disjoint slice:
``torchrun --nproc-per-node 8 -m klvae.cli cache DATA -o OUT --device cuda``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from klvae.cache.settings import SAVE_DTYPE_NAMES, CacheSettings
    from klvae.cli.options import add_model_options

    d = CacheSettings(dataset=(), out_dir="")
    p = sub.add_parser("cache", help="encode an image dataset to latent shards + index (resumable, torchrun)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="+", metavar="DATASET", help="image folder, .tar shards, or a shard pattern")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="cache folder (created; resumed if it "
                   "holds a cache made the same way)")
    b = p.add_argument_group("buckets")
    b.add_argument("--resolution", type=int, default=d.resolution, help="bucket area is about RESOLUTION^2 pixels")
    b.add_argument("--bucket-step", type=int, default=d.bucket_step, help="bucket sides are multiples of this")
    b.add_argument("--max-aspect", type=float, default=d.max_aspect, help="largest bucket aspect ratio")
    b.add_argument("--no-aspect-buckets", dest="aspect_buckets", action="store_false",
                   help="one square RESOLUTION x RESOLUTION bucket (centre crop)")
    s = p.add_argument_group("what is stored")
    s.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped image")
    s.add_argument("--moments", action="store_true", help="also store the posterior's log-variance")
    s.add_argument("--scaled", action="store_true", help="apply the model's latent scaling")
    s.add_argument("--save-dtype", choices=SAVE_DTYPE_NAMES, default=d.save_dtype, help="stored latent dtype")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="images per encode call")
    r.add_argument("--shard-size", type=int, default=d.shard_size, help="images per shard file")
    r.add_argument("--workers", type=int, default=d.workers, help="image loading threads")
    r.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip it "
                   "and list it in OUT_DIR/failed.jsonl)")
    r.add_argument("--force", action="store_true", help="delete a different cache in OUT_DIR and start over")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import time

    from klvae.cache.pipeline import run_cache
    from klvae.cache.settings import CacheSettings
    from klvae.cli.common import load_runner, note

    settings = CacheSettings(
        dataset=tuple(args.dataset), out_dir=args.output, resolution=args.resolution, bucket_step=args.bucket_step,
        max_aspect=args.max_aspect, aspect_buckets=args.aspect_buckets, flip=args.flip, moments=args.moments,
        scaled=args.scaled, save_dtype=args.save_dtype, batch_size=args.batch_size, shard_size=args.shard_size,
        workers=args.workers, strict=args.strict, force=args.force, quiet=args.quiet)
    runner = load_runner(args)
    start = time.perf_counter()
    summary = run_cache(settings, runner)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", 0)) == 0:
        rate = f", {summary.encoded / seconds:.2f} images/s" if summary.encoded else ""
        failed = f", {summary.failed} unreadable (see failed.jsonl)" if summary.failed else ""
        note(f"cache {args.output}: {summary.images} images in the index; this run encoded {summary.encoded} in "
             f"{summary.shards} shard(s) ({seconds:.1f} s{rate}), {summary.skipped} were already done{failed}",
             args.quiet)
    return 0
