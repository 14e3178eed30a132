"""The colour of chelsea's eyes after a round trip: the small, saturated detail that a VAE turns grey-brown first.

    python benchmarks/chelsea_iris_colour.py [MODEL ...] [--threads 2]

scikit-image's chelsea has olive-yellow irises (mean about R 126, G 104, B 54: hue 41 degrees, HSV saturation
0.57). A model that regresses small saturated regions toward grey raises their blue and lowers their green, and
the eyes come back brown. This reconstructs the whole photograph (cropped to a multiple of 8) through each
model's posterior mode and prints, over the iris pixels, the mean colour, the mean error per channel, the hue and
saturation of the mean colour, and the root-mean-square error. MODEL is anything ``klvae eval`` loads (default:
the bundled model; EMA weights for training runs).

The iris mask: two discs drawn by hand around the eyes (centres and radii in pixels of the 451x300 photograph),
minus the pupils, the eyelids and the fur (kept: pixels brighter than 60 on average with B < 0.6 R and
G > 0.75 R, which is the irises' olive and not the fur's orange).
"""

from __future__ import annotations

import argparse
import colorsys

import numpy as np
import torch

from klvae.torch.train.evaluation import load_any_model
from klvae.train.data import to_model_input

EYES = ((172, 118, 27), (318, 136, 19))          # (x, y, radius) of the left and right eye


def chelsea() -> np.ndarray:
    from skimage import data

    image = data.chelsea()
    h, w = image.shape[:2]
    return image[: h // 8 * 8, : w // 8 * 8]


def iris_mask(image: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    discs = np.zeros(image.shape[:2], dtype=bool)
    for x, y, r in EYES:
        discs |= (xx - x) ** 2 + (yy - y) ** 2 < r * r
    f = image.astype(np.float64)
    olive = (f.sum(-1) > 180) & (f[..., 2] < 0.6 * f[..., 0]) & (f[..., 1] > 0.75 * f[..., 0])
    return discs & olive


def reconstruct(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(to_model_input(image[None]))).sample
    return np.clip((out[0].permute(1, 2, 0).numpy() + 1) * 127.5, 0, 255)


def describe(colour: np.ndarray) -> str:
    h, s, _ = colorsys.rgb_to_hsv(*(colour / 255.0))
    return f"{colour[0]:6.1f} {colour[1]:6.1f} {colour[2]:6.1f}   hue {h * 360:5.1f}  sat {s:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[None])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = chelsea()
    mask = iris_mask(image)
    truth = image[mask].astype(np.float64)
    print(f"iris pixels: {mask.sum()}")
    print(f"{'input':40s} {describe(truth.mean(0))}")
    for name in args.models:
        rec = reconstruct(load_any_model(name, use_ema=True), image)[mask].astype(np.float64)
        error = (rec - truth).mean(0)
        rmse = float(np.sqrt(((rec - truth) ** 2).mean()))
        print(f"{str(name or 'bundled'):40s} {describe(rec.mean(0))}   error R/G/B "
              f"{error[0]:+.1f}/{error[1]:+.1f}/{error[2]:+.1f}  rmse {rmse:.1f}")


if __name__ == "__main__":
    main()
