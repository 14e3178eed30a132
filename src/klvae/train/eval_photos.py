"""The default model's evaluation photographs, never trained on, and a report of a model's reconstructions::

    python -m klvae.train.eval_photos [MODEL] [--threads 2] [--json out.json] [--markdown]

Two groups, reported separately (files are found inside the installed packages, nothing is downloaded):

- scikit-image hold-outs: camera, chelsea, coffee (held out of the training manifest, ``photos.json``);
- other packages: scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg (``pip install
  scikit-learn matplotlib``).

Each whole image (cut to a multiple of 8) goes through the posterior mode; per image PSNR, SSIM, the colour spread
ratio, the per-channel mean error and the border/interior PSNR are printed (see ``klvae eval``), then each
group's mean and the mean over all six.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

# group -> [(name, module, path relative to the module's folder)]
EVAL_PHOTOS = {
    "scikit-image hold-outs": [("camera", "skimage", "data/camera.png"), ("chelsea", "skimage", "data/chelsea.png"),
                               ("coffee", "skimage", "data/coffee.png")],
    "other packages": [("china", "sklearn", "datasets/images/china.jpg"),
                       ("flower", "sklearn", "datasets/images/flower.jpg"),
                       ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg")],
}
PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


class EvalPhotoError(FileNotFoundError):
    """An evaluation photograph's package is not installed or lacks the file."""


def find_photo(module: str, relpath: str) -> str:
    """The path of a sample image inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise EvalPhotoError(f"evaluation photographs need {PIP_NAMES.get(module, module)}: "
                             f"pip install {PIP_NAMES.get(module, module)}")
    path = os.path.join(os.path.dirname(spec.origin), relpath)
    if not os.path.isfile(path):
        raise EvalPhotoError(f"{path}: not found in the installed {PIP_NAMES.get(module, module)}")
    return path


def eval_photo_paths() -> dict[str, dict[str, str]]:
    """``{group: {name: path}}`` for every evaluation photograph."""
    return {group: {name: find_photo(module, rel) for name, module, rel in items}
            for group, items in EVAL_PHOTOS.items()}


def evaluate_photos(model, lpips=None) -> dict:
    """Per-image metrics and per-group summaries: ``{"groups": {group: {"images": rows, "summary": ...}},
    "all": summary}``."""
    from klvae.torch.train.evaluation import evaluate, print_table, summarize
    from klvae.train.data import center_crop, load_rgb

    f = model.config.downsample_factor
    report, every = {"groups": {}}, {}
    for group, paths in eval_photo_paths().items():
        images = [center_crop(load_rgb(p), None, f) for p in paths.values()]
        values = evaluate(model, images, lpips)
        print(f"== {group}")
        rows = print_table(list(paths), images, values)
        summary = summarize(values)
        print("mean: " + ", ".join(f"{m} {s['mean']:.3f}" for m, s in summary.items()))
        report["groups"][group] = {"images": rows, "summary": summary}
        for m, v in values.items():
            every.setdefault(m, []).extend(v)
    report["all"] = summarize(every)
    print("== all six: " + ", ".join(f"{m} {s['mean']:.3f}" for m, s in report["all"].items()))
    return report


def markdown(report: dict) -> str:
    """The report as a Markdown table: one row per image, then a mean row per group and for all."""
    head = ["image", "size", "PSNR dB", "SSIM", "colour", "chroma err", "err R/G/B", "PSNR border / interior",
            "worst edge line"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(name: str, size: str, v: dict) -> str:
        colour = "grey input" if math.isnan(v["colour"]) else f"{v['colour']:.3f}"
        return (f"| {name} | {size} | {v['psnr']:.2f} | {v['ssim']:.3f} | {colour} | {v['chroma_err']:.1f} | "
                f"{v['err_r']:+.1f} / {v['err_g']:+.1f} / {v['err_b']:+.1f} | "
                f"{v['psnr_border']:.2f} / {v['psnr_interior']:.2f} | {v['psnr_edge_line']:.2f} |")

    for group, data in report["groups"].items():
        for row in data["images"]:
            lines.append(cells(row["image"], f"{row['width']}x{row['height']}", row))
        lines.append(cells(f"**mean, {group}**", "", {m: s["mean"] for m, s in data["summary"].items()}))
    lines.append(cells("**mean, all six**", "", {m: s["mean"] for m, s in report["all"].items()}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klvae.train.eval_photos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="diffusers folder, single file, training checkpoint "
                        "or run folder (default: klvae.DEFAULT_MODEL)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lpips", choices=("auto", "yes", "no"), default="no", help="also LPIPS-VGG")
    parser.add_argument("--no-ema", action="store_true", help="for training checkpoints: the raw weights")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the report as a Markdown table")
    args = parser.parse_args(argv)

    from klvae.torch.train.evaluation import load_model_and_lpips

    model, lpips = load_model_and_lpips(args.model, not args.no_ema, args.lpips, args.threads)
    report = evaluate_photos(model, lpips)
    if args.markdown:
        print(markdown(report))
    if args.json:
        from klvae.fileio import atomic_write_bytes

        report = {"model": args.model, **report}
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
