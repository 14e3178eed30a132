"""Mean reconstruction error per channel against the size of the image a model sees.

    python benchmarks/colour_bias_by_size.py [MODEL] [--data runs/photos/train] [--sizes 64,128,256] [--threads 2]

A model trained on small crops can meet its loss on crops and still carry a colour cast on whole photographs, if
something in it (GroupNorm statistics, attention over more tokens) behaves differently at larger sizes. This
reconstructs random crops of each size (scale 0.5-1, as in training, no colour jitter; a fixed seed, so every
model sees the same crops) and prints the mean of reconstruction - input per channel in 8-bit levels. MODEL is
anything ``klvae eval`` loads (default: klvae.DEFAULT_MODEL; EMA weights for training runs).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from klvae.torch.train.evaluation import load_any_model
from klvae.train.data import ImageFolder

PIXELS_PER_SIZE = 8 * 32 * 64 * 64      # about 1M pixels per size: 256 crops of 64, 64 of 128, 16 of 256


def mean_error_levels(model, folder: ImageFolder, batches: int) -> np.ndarray:
    """Mean of (reconstruction - input) per channel over ``batches`` batches, in 8-bit levels."""
    errors = []
    for step in range(batches):
        x = torch.from_numpy(folder.batch(step))
        with torch.no_grad():
            rec = model(x).sample
        errors.append((rec - x).mean(dim=(0, 2, 3)).numpy() * 127.5)
    return np.mean(errors, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--data", default="runs/photos/train")
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_any_model(args.model, use_ema=True)
    print("crop size   mean error R / G / B (8-bit levels)")
    for size in (int(s) for s in args.sizes.split(",")):
        batch_size = max(1, min(32, PIXELS_PER_SIZE // (8 * size * size)))
        batches = max(1, PIXELS_PER_SIZE // (batch_size * size * size))
        folder = ImageFolder(args.data, size, batch_size=batch_size, seed=1, min_scale=0.5)
        r, g, b = mean_error_levels(model, folder, batches)
        print(f"{size:9d}   {r:+.1f} / {g:+.1f} / {b:+.1f}   ({batches} batches of {batch_size})")


if __name__ == "__main__":
    main()
