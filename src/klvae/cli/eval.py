"""``klvae eval [MODEL] IMAGE_DIR``: reconstruction quality of a VAE on a folder of images.

Each image is encoded, its posterior's mode decoded, and PSNR, SSIM (and LPIPS-VGG when its weights are
installed) are reported per image and as mean +- std, as the SD VAE model cards report them, with colour and edge
metrics (``klvae.train.recon_metrics``): ``colour`` = the reconstruction's colour spread over the original's
(mean over pixels of the std across R, G, B; 1 = colour kept), ``err_r/g/b`` = mean error per channel in 8-bit
levels, ``psnr_border`` / ``psnr_interior`` = PSNR of the 16-pixel border band and of the rest,
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


def load_any_model(path: str | None, use_ema: bool = True):
    """An AutoencoderKL (or FLUX.2's VAE) from a diffusers folder, a training run/checkpoint or a single file (eval
    mode, fp32)."""
    from klvae.torch import auto
    from klvae.torch.train.checkpoint import model_from_checkpoint

    if path is None:
        from klvae import DEFAULT_MODEL

        path = DEFAULT_MODEL
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return auto.from_pretrained(path).float().eval()
        return model_from_checkpoint(path, use_ema=use_ema).float()
    if path.endswith(".pt"):
        import torch

        head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(head, dict) and "model_config" in head:
            return model_from_checkpoint(path, use_ema=use_ema).float()
    return auto.from_single_file(path).float().eval()


def evaluate(model, images: list, lpips=None) -> dict[str, list[float]]:
    """Per-image metrics of uint8 HWC images reconstructed through the posterior mode: PSNR, SSIM (and LPIPS
    when given; all as ``evaluate_images`` of the trainer computes them) plus the colour and border metrics."""
    import torch

    from klvae.torch.train.metrics import psnr, ssim, to_unit
    from klvae.train.data import to_model_input, to_uint8
    from klvae.train.recon_metrics import reconstruction_metrics

    out: dict[str, list[float]] = {"psnr": [], "ssim": []}
    if lpips is not None:
        out["lpips"] = []
    param = next(model.parameters())
    for image in images:
        x = torch.from_numpy(to_model_input(image[None])).to(param.device)
        with torch.no_grad():
            rec = model(x.to(param.dtype)).sample.float()
            a, b = to_unit(x), to_unit(rec)
            out["psnr"].append(float(psnr(a, b)[0]))
            out["ssim"].append(float(ssim(a, b)[0]))
            if lpips is not None:
                out["lpips"].append(float(lpips(x, rec.clamp(-1, 1)).flatten()[0]))
        for key, value in reconstruction_metrics(image, to_uint8(rec.cpu().numpy())[0]).items():
            out.setdefault(key, []).append(value)
    return out


def print_table(names: list[str], images: list, values: dict[str, list[float]]) -> list[dict]:
    """Print one row per image (all metrics) under a header; returns the rows as dicts."""
    metrics = list(values)
    width = max(len(n) for n in names)
    print(f"{'image':{width}s}  {'size':>9s}  " + "  ".join(f"{m:>13s}" for m in metrics))
    rows = []
    for i, (name, im) in enumerate(zip(names, images)):
        row = {"image": name, "height": im.shape[0], "width": im.shape[1], **{m: values[m][i] for m in metrics}}
        rows.append(row)
        print(f"{name:{width}s}  {im.shape[0]:>4d}x{im.shape[1]:<4d}  " + "  ".join(f"{row[m]:13.4f}" for m in metrics))
    return rows


def summarize(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Mean and std per metric over the images where it is defined (NaN values, e.g. the colour ratio of a grey
    image, are left out; ``n`` says how many were counted)."""
    import math

    from klvae.torch.train.metrics import mean_std

    out = {}
    for m, v in values.items():
        kept = [x for x in v if not math.isnan(x)]
        out[m] = {**dict(zip(("mean", "std"), mean_std(kept))), "n": len(kept)}
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from klvae.train.data import load_eval_images

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_any_model(args.model, use_ema=not args.no_ema)
    lpips = None
    if args.lpips != "no":
        from klvae.torch.train.lpips import LPIPS, find_weights

        if args.lpips == "yes" or find_weights() is not None:
            lpips = LPIPS()
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
