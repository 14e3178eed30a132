"""Is it the encoder or the decoder that loses the colour of chelsea's eyes? Fit the latent, keep the decoder.

    python benchmarks/chelsea_iris_latent_fit.py [MODEL] [--steps 200] [--chroma-weight 0] [--threads 2]

Takes the 128x256 crop around chelsea's eyes, encodes it (posterior mode), then optimises the latent alone
(Adam, lr 0.05) to minimise the decoder's squared error on the crop, plus ``chroma_weight`` times the squared
error off the grey axis (the trainer's chroma term). It prints the iris colour (the mask of
``chelsea_iris_colour.py``) and the crop's PSNR from the encoder's latent and from the fitted one. If even the
fitted latent gives the wrong colour, no encoder can fix it: the decoder cannot draw that colour there.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chelsea_iris_colour import chelsea, describe, iris_mask  # noqa: E402

from klvae.torch.train.evaluation import load_any_model  # noqa: E402
from klvae.train.data import to_model_input  # noqa: E402

CROP = (slice(64, 192), slice(128, 384))             # rows, columns: both eyes, a multiple of 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--chroma-weight", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = chelsea()
    crop, mask = image[CROP], iris_mask(image)[CROP]
    truth = crop.astype(np.float64)
    model = load_any_model(args.model, use_ema=True).requires_grad_(False)
    x = torch.from_numpy(to_model_input(crop[None]))

    def report(label: str, z: torch.Tensor) -> None:
        with torch.no_grad():
            rec = np.clip((model.decode(z).sample[0].permute(1, 2, 0).numpy() + 1) * 127.5, 0, 255)
        psnr = 10 * np.log10(255.0 ** 2 / np.mean((rec - truth) ** 2))
        print(f"{label:16s} iris {describe(rec[mask].mean(0))}   crop PSNR {psnr:.2f} dB")

    print(f"{'input':16s} iris {describe(truth[mask].mean(0))}")
    with torch.no_grad():
        z0 = model.encode(x).latent_dist.mode()
    report("encoder latent", z0)
    z = z0.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=0.05)
    for _ in range(args.steps):
        optimiser.zero_grad()
        d = model.decode(z).sample - x
        loss = d.square().sum() + args.chroma_weight * (d - d.mean(dim=1, keepdim=True)).square().sum()
        loss.backward()
        optimiser.step()
    report("fitted latent", z.detach())


if __name__ == "__main__":
    main()
