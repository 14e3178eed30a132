"""``klvae roundtrip [IMAGES...] [-o DIR]``: encode and decode images, and report how close they come back.

Without IMAGES it reconstructs the bundled sample photograph (a cat, CC0), which the default model never saw
in training.

Prints a table of PSNR (dB) and SSIM per image (and their mean) on stdout. The reconstruction is the
posterior's mode, decoded and rounded to the source's bit depth; both metrics compare it with the image as
the model sees it (channels adapted), at full size. With ``-o DIR`` it also writes ``DIR/<name>.png`` (the
reconstruction) and ``DIR/<name>-compare.png``: original | reconstruction | error heat map, where the
brightest colour is an absolute error of ``--error-scale`` (of the [0, 1] range) or more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from klvae.cli.options import add_model_options, add_output_options

    p = sub.add_parser("roundtrip", help="reconstruct images; PSNR/SSIM table and comparison pictures",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files, or folders of them (default: the bundled sample photograph)")
    p.add_argument("-o", "--output", metavar="DIR", help="write reconstructions and comparison images here")
    p.add_argument("--error-scale", type=float, default=0.1,
                   help="absolute error shown at full brightness in the heat map")
    p.add_argument("--json", action="store_true", help="print the table as JSON lines instead")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from klvae.cli.common import (CLIError, check_images_readable, check_outputs, expand_inputs, load_runner, note,
                                  unique_stems)
    from klvae.cli.quality import comparison_image, psnr, ssim
    from klvae.data import SAMPLE_IMAGE
    from klvae.images import (from_model_output, is_image_name, pad_to_multiple, quantize, read_image, to_channels,
                              to_model_input, write_image)
    from klvae.progress import progress

    if not args.error_scale > 0:
        raise CLIError(f"--error-scale must be positive, got {args.error_scale}")
    sample = not args.images
    if sample:
        args.images = [SAMPLE_IMAGE]
    images = expand_inputs(args.images, is_image_name, "images")
    stems = unique_stems(images)
    if args.output:
        check_outputs([os.path.join(args.output, f"{s}{suffix}.png") for s in stems for suffix in ("", "-compare")],
                      args.force)
    check_images_readable(images)
    runner = load_runner(args)
    cfg = runner.config
    shown = {SAMPLE_IMAGE: os.path.basename(SAMPLE_IMAGE)} if sample else {}
    rows = []
    for path, stem in progress(list(zip(images, stems)), len(images), "roundtrip", args.quiet):
        img = read_image(path)
        original = to_channels(img.pixels, cfg.in_channels, path)
        x = to_model_input(pad_to_multiple(original, runner.factor))[None]
        mean, _ = runner.encode(x)
        h, w = img.size
        top = 255.0 if img.bits == 8 else 65535.0
        recon = quantize(from_model_output(runner.decode(mean)[0])[:h, :w], img.bits).astype("float32") / top
        rows.append({"image": shown.get(path, path), "size": f"{w}x{h}", "latents": "x".join(map(str, mean.shape[1:])),
                     "psnr": psnr(original, recon), "ssim": ssim(original, recon)})
        if args.output and runner.writes:
            os.makedirs(args.output, exist_ok=True)
            write_image(os.path.join(args.output, f"{stem}.png"), recon, img.bits)
            write_image(os.path.join(args.output, f"{stem}-compare.png"),
                        comparison_image(original, recon, args.error_scale), 8)
    if runner.writes:  # one table from a distributed run
        _print_table(rows, args.json)
    note(f"model: {runner.describe()}" + (f"; wrote reconstructions and comparisons to {args.output}"
                                          if args.output else ""), args.quiet)
    return 0


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _print_table(rows: list[dict], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                              for k, v in r.items()}))
        return
    name_w = max(len("image"), *(len(r["image"]) for r in rows))
    size_w = max(len("size"), *(len(r["size"]) for r in rows))
    lines = [f"{'image':<{name_w}}  {'size':>{size_w}}  {'PSNR dB':>8}  {'SSIM':>6}"]
    for r in rows:
        lines.append(f"{r['image']:<{name_w}}  {r['size']:>{size_w}}  {_fmt(r['psnr'], 2):>8}  {_fmt(r['ssim'], 4):>6}")
    if len(rows) > 1:
        finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
        ssims = [r["ssim"] for r in rows if not math.isnan(r["ssim"])]
        mean_p = sum(finite) / len(finite) if finite else math.nan
        mean_s = sum(ssims) / len(ssims) if ssims else math.nan
        lines.append(f"{'mean':<{name_w}}  {'':>{size_w}}  {_fmt(mean_p, 2):>8}  {_fmt(mean_s, 4):>6}")
    print("\n".join(lines))
    sys.stdout.flush()
