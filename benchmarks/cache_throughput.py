"""Latent caching throughput: ``klvae cache`` against a plain loop over diffusers' ``AutoencoderKL.encode``.

Both encode the same JPEG dataset with the same weights, batch size and dtype, and store the posterior mode.
The plain loop is what a training script does inline: open each image with Pillow, resize the short side and
centre-crop to RESOLUTION, stack a batch, ``vae.encode(x).latent_dist.mode()``, save the batch. klvae's cache
is timed twice: with one square bucket (the same geometry as the loop) and with aspect-ratio buckets. Model
loading is outside the timings; each run starts from a cold output folder.

    python benchmarks/cache_throughput.py [--images 64] [--resolution 256] [--batch-size 8] [--workers 4]

Each timing follows an untimed warm-up encode; the runs are interleaved ``--repeat`` times and the fastest
of each is reported (the machine this was written on is shared and noisy). The model is ``klvae.DEFAULT_MODEL`` when it is installed, else a random KL-f8 model of similar size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

SIZES = ((480, 640), (640, 480), (512, 512), (384, 683))  # (height, width)
FALLBACK = dict(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32)


def make_dataset(folder: str, n: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[:h, :w] / max(h, w)
        base = np.stack([np.sin(rng.uniform(2, 12) * xx + rng.uniform(2, 12) * yy + rng.uniform(0, 6))
                         for _ in range(3)], -1)
        a = np.clip((base + 1) * 110 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def model_folder(tmp: str) -> tuple[str, str]:
    import klvae

    default = getattr(klvae, "DEFAULT_MODEL", None)
    if default is not None and os.path.isfile(os.path.join(default, "config.json")):
        return os.fspath(default), "klvae.DEFAULT_MODEL"
    torch.manual_seed(0)
    path = os.path.join(tmp, "model")
    klvae.AutoencoderKL(**FALLBACK).save_pretrained(path)
    return path, f"random KL-f8 {FALLBACK['block_out_channels']}"


def plain_loop(files: list[str], model_dir: str, resolution: int, batch_size: int, out: str) -> float:
    """diffusers encode in a plain loop; returns seconds."""
    import diffusers
    from safetensors.torch import save_file

    vae = diffusers.AutoencoderKL.from_pretrained(model_dir).eval()
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():  # warm-up, untimed
        vae.encode(torch.zeros(batch_size, 3, resolution, resolution))
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(files), batch_size):
            batch = []
            for path in files[b:b + batch_size]:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    s = resolution / min(im.size)
                    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))),
                                   Image.Resampling.LANCZOS)
                    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
                    im = im.crop((left, top, left + resolution, top + resolution))
                batch.append(torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1))
            z = vae.encode(torch.stack(batch)).latent_dist.mode()
            save_file({os.path.basename(p): t.contiguous() for p, t in zip(files[b:b + batch_size], z)},
                      os.path.join(out, f"{b:06d}.safetensors"))
    return time.perf_counter() - start


def klvae_cache(data: str, model_dir: str, resolution: int, batch_size: int, workers: int, out: str,
                aspect: bool) -> float:
    from klvae.cache.pipeline import run_cache
    from klvae.cache.settings import CacheSettings
    from klvae.cli.common import ModelSource, TorchRunner

    runner = TorchRunner(ModelSource("folder", model_dir, model_dir), "fp32", "cpu", None, None)
    runner.encode(np.zeros((batch_size, 3, resolution, resolution), np.float32))  # warm-up, untimed
    settings = CacheSettings(dataset=(data,), out_dir=out, resolution=resolution, aspect_buckets=aspect,
                             batch_size=batch_size, workers=workers, quiet=True)
    start = time.perf_counter()
    summary = run_cache(settings, runner)
    assert summary.images == summary.encoded, summary
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved; the fastest is reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        make_dataset(data, args.images)
        files = sorted(os.path.join(data, f) for f in os.listdir(data))
        model_dir, model_name = model_folder(tmp)
        print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads) | python {sys.version.split()[0]}")
        print(f"# model: {model_name}; {args.images} JPEGs of {', '.join(f'{w}x{h}' for h, w in SIZES)}; "
              f"resolution {args.resolution}, batch {args.batch_size}, float32, CPU")
        results = {}
        runs = (("diffusers plain loop (square crop)", lambda o: plain_loop(files, model_dir, args.resolution,
                                                                             args.batch_size, o)),
                ("klvae cache, one square bucket", lambda o: klvae_cache(data, model_dir, args.resolution,
                                                                          args.batch_size, args.workers, o, False)),
                ("klvae cache, aspect buckets", lambda o: klvae_cache(data, model_dir, args.resolution,
                                                                       args.batch_size, args.workers, o, True)))
        times: dict[str, list[float]] = {name: [] for name, _ in runs}
        for _ in range(args.repeat):  # interleaved, so a burst of load on the shared machine hits all alike
            for name, fn in runs:
                out = os.path.join(tmp, "out")
                times[name].append(fn(out))
                shutil.rmtree(out)
        for name, seconds in times.items():
            results[name] = args.images / min(seconds)
            print(f"{name:<40} {results[name]:8.2f} images/s  (runs: {', '.join(f'{t:.1f}' for t in seconds)} s)")
        base = results["diffusers plain loop (square crop)"]
        for name, rate in list(results.items())[1:]:
            print(f"{name:<40} {rate / base:8.2f}x the plain loop")


if __name__ == "__main__":
    main()
