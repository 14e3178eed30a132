"""Time the bundled default model (klvae.DEFAULT_MODEL), or other models beside it, on a 512x512 image, fp32 on the CPU.

    python benchmarks/default_model_speed.py [MODEL ...] [--size 512] [--threads 2] [--repeats 5]

MODEL is a diffusers-format folder (default: the bundled model). With several, the calls are interleaved (model
A, model B, A, B, ...) so that a machine whose speed drifts treats them alike, and each model's median is also
given as a ratio to the first's. Prints the median of ``--repeats`` calls after two warm-ups for decode (a random
latent) and encode (a random image).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import klvae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[klvae.DEFAULT_MODEL])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = [klvae.AutoencoderKL.from_pretrained(path).float().eval() for path in args.models]
    cfg = models[0].config
    f = cfg.downsample_factor
    z = torch.randn(1, cfg.latent_channels, args.size // f, args.size // f)
    x = torch.rand(1, cfg.in_channels, args.size, args.size) * 2 - 1
    ops = {"decode": lambda m: m.decode(z).sample, "encode": lambda m: m.encode(x).latent_dist.mode()}
    with torch.no_grad():
        for op, call in ops.items():
            times: list[list[float]] = [[] for _ in models]
            for _ in range(2):
                for model in models:
                    call(model)
            for _ in range(args.repeats):
                for model, record in zip(models, times):
                    start = time.perf_counter()
                    call(model)
                    record.append(time.perf_counter() - start)
            first = statistics.median(times[0])
            for path, record in zip(args.models, times):
                median = statistics.median(record)
                ratio = f", {median / first:.3f}x the first" if len(models) > 1 else ""
                print(f"{path}: {op} {args.size}x{args.size} fp32, {args.threads} threads: median {median:.3f} s"
                      f"{ratio} ({', '.join(f'{t:.3f}' for t in record)})")


if __name__ == "__main__":
    main()
