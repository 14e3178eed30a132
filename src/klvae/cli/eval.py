"""``klvae eval [MODEL] IMAGE_DIR``: reconstruction quality of a VAE on a folder of images.

Each image is encoded, its posterior's mode decoded, and PSNR, SSIM (and LPIPS-VGG when its weights are
installed) are reported per image and as mean +- std, as the SD VAE model cards report them, with colour and edge
metrics (``klvae.train.recon_metrics``): ``colour`` = the reconstruction's colour spread over the original's
(mean over pixels of the std across R, G, B; 1 = colour kept), ``chroma_err`` = the same spread of the error
image in 8-bit levels (hue, tint and fading errors; 0 for a pure brightness error), ``err_r/g/b`` = mean error
per channel in 8-bit levels, ``psnr_border`` / ``psnr_interior`` = PSNR of the 16-pixel border band and of the rest,
``psnr_edge_line`` = the lowest PSNR of the four 2-pixel strips along the edges. MODEL is a
diffusers folder, a single-file checkpoint, a training checkpoint or run folder; without it, klvae's default model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="PSNR/SSIM/LPIPS of a VAE's reconstructions of a folder of images",
                       description=__doc__)
    p.add_argument("model", nargs="?", default=None, help="diffusers folder, single file, training checkpoint or run "
                   "folder (default: klvae.DEFAULT_MODEL)")
    p.add_argument("image_dir", help="folder of images (nested folders, jpg/png/webp)")
    p.add_argument("--size", type=int, default=None,
                   help="centre-crop each image to SIZE x SIZE (default: the whole image, cut to a multiple of 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--lpips", choices=("auto", "yes", "no"), default="auto",
                   help="LPIPS-VGG: auto = when its weights are installed")
    p.add_argument("--no-ema", action="store_true", help="for training checkpoints: the raw weights, not the EMA")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from klvae.torch.train.evaluation import evaluate, load_model_and_lpips, print_table, summarize
    from klvae.train.data import load_eval_images

    model, lpips = load_model_and_lpips(args.model, not args.no_ema, args.lpips, args.threads)
    paths, images = load_eval_images(args.image_dir, args.size, model.config.downsample_factor, args.limit)
    values = evaluate(model, images, lpips)
    rows = print_table([os.path.relpath(p, args.image_dir) for p in paths], images, values)
    summary = summarize(values)
    print(f"{len(rows)} images: " + ", ".join(f"{m.upper()} {s['mean']:.4f} +- {s['std']:.4f}"
                                            + (f" (n={s['n']})" if s["n"] != len(rows) else "")
                                            for m, s in summary.items()))
    if args.json:
        from klvae.fileio import atomic_write_bytes

        out = {"model": args.model, "image_dir": args.image_dir, "size": args.size, "images": rows,
               "summary": summary}
        atomic_write_bytes(args.json, (json.dumps(out, indent=2) + "\n").encode())
    sys.stdout.flush()
    return 0
