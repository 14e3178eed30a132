"""Error maps of tiled decodes against the untiled decode, side by side (the picture in docs/tiling.md).

Reads the outputs that ``tiling_bench.py sweep`` saved (``--outputs``), for one size:

    python benchmarks/tiling_error_maps.py --size 2048 --out docs/tiling_error_maps.png

Each panel is max over RGB of |tiled - untiled| per pixel, on one shared logarithmic colour scale, so the tile
grid of blend tiling (its own GroupNorm statistics and attention per tile, linear blends) stands out and exact
tiling's float rounding (about 1e-6 of the image range) sits at the bottom of the scale.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--outputs", default="/tmp/klvae_tiling_outputs")
    parser.add_argument("--out", default="docs/tiling_error_maps.png")
    parser.add_argument("--note", default="SD-architecture VAE, seeded random weights, fp32, random latents")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    def load(impl: str, mode: str) -> np.ndarray:
        return np.load(os.path.join(args.outputs, f"decode_{args.size}_{impl}_{mode}_t512.npy"))[0]

    reference = load("klvae", "untiled")
    panels = [("blend (diffusers' tiling)", load("klvae", "blend")), ("exact", load("klvae", "exact"))]
    scale = float(np.abs(reference).max())
    maps = [(title, np.abs(out - reference).max(axis=0) / scale) for title, out in panels]
    floor = 1e-8
    norm = LogNorm(vmin=floor, vmax=max(float(m.max()) for _, m in maps))
    fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 6.4), constrained_layout=True)
    for ax, (title, err) in zip(axes, maps):
        image = ax.imshow(np.maximum(err, floor), norm=norm, cmap="magma", interpolation="nearest")
        ax.set_title(f"{title}: max rel. err {err.max():.1e}, mean {err.mean():.1e}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="|tiled - untiled| / max|untiled| (max over RGB)")
    fig.suptitle(f"Tiled vs untiled decode, {args.size}x{args.size} (blend: 512-pixel tiles, exact: 256; {args.note})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
