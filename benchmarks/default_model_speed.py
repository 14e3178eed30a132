"""Time the bundled default model (klvae.DEFAULT_MODEL) on a 512x512 image, float32 on the CPU.

    python benchmarks/default_model_speed.py [--size 512] [--threads 2] [--repeats 5]

Prints the median of ``--repeats`` calls after one warm-up for decode (a random latent) and encode (a random image).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import klvae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = klvae.AutoencoderKL.from_pretrained(klvae.DEFAULT_MODEL).float().eval()
    f = model.config.downsample_factor
    z = torch.randn(1, model.config.latent_channels, args.size // f, args.size // f)
    x = torch.rand(1, model.config.in_channels, args.size, args.size) * 2 - 1
    calls = {"decode": lambda: model.decode(z).sample, "encode": lambda: model.encode(x).latent_dist.mode()}
    with torch.no_grad():
        for op, call in calls.items():
            call()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            print(f"default model {op} {args.size}x{args.size} fp32, {args.threads} threads: "
                  f"median {statistics.median(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
