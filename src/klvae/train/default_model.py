"""The recipe of the bundled default model, as commands run from the repository root::

    python -m klvae.train.default_model --prepare-data        # download + verify + write the photographs (once)
    torchrun --standalone --nproc_per_node 2 -m klvae.train.default_model [--config ...] [--max-steps N]
    python -m klvae.train.default_model [--config configs/default_model.toml] [--max-steps N]   # one process
    python -m klvae.train.default_model --export src/klvae/default_model   # EMA weights + own scaling_factor
    python -m klvae.train.default_model --latent-scale [MODEL]    # what the scaling rule gives for a model

The photographs are those of ``klvae/train/photos.json`` (the manifest: Debian wallpaper photographs and
scikit-image's photographs, each with package, path, licence and sha256): ``--prepare-data`` fetches the pinned
Debian packages (``apt-get download`` + ``dpkg -x``) into a cache beside the data folders and writes the
manifest's ``train`` images into the config's ``train_dir`` and its ``heldout`` ones (scikit-image's camera,
chelsea, coffee) into ``val_dir``. Training completes those folders from the cache (atomically, so every rank may
do it) and refuses to start when a package is not fetched yet. Other packages' images (scikit-learn's,
matplotlib's) are never trained on: they are evaluation data (``python -m klvae.train.eval_photos``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# scikit-image loaders of the held-out photographs (the manifest's "heldout" images are these files).
HELDOUT_IMAGES = ("chelsea", "coffee", "camera")
DEFAULT_CONFIG = os.path.join("configs", "default_model.toml")


def skimage_photos(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``{name: (H, W, 3) uint8}`` from scikit-image's bundled data (grey images repeated to RGB)."""
    try:
        import skimage.data as data
    except ImportError:
        raise SystemExit("the default-model recipe needs scikit-image: pip install scikit-image") from None
    out = {}
    for name in names:
        value = getattr(data, name)()
        if name == "stereo_motorcycle":                  # (left, right, disparity)
            out["motorcycle_left"], out["motorcycle_right"] = value[0], value[1]
            continue
        image = np.asarray(value)
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.dtype.kind == "f" else image.astype(np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        out[name] = image[:, :, :3]
    return out


def default_cache_dir(train_dir: str) -> str:
    """The package cache: ``debian-cache`` beside the training folder (under the git-ignored runs/)."""
    return os.path.join(os.path.dirname(os.path.abspath(train_dir)), "debian-cache")


def prepare_data(train_dir: str, val_dir: str, cache_dir: str | None = None, *, fetch: bool = False,
                 deb_dir: str | None = None, manifest_path: str | None = None, log=print) -> dict[str, int]:
    """Write the manifest's training and held-out images that are not there yet, each atomically (so the ranks
    of a ``torchrun`` launch can all call this). With ``fetch``, first download and unpack the pinned Debian
    packages into ``cache_dir``; without it a package missing from the cache is an error. Returns the number of
    images per folder."""
    from klvae.train.photos import MANIFEST_PATH, fetch_packages, load_manifest, prepare_folder

    manifest = load_manifest(manifest_path or MANIFEST_PATH)
    cache_dir = cache_dir or default_cache_dir(train_dir)
    if fetch:
        fetch_packages(manifest, cache_dir, deb_dir, log=log)
    counts = {}
    for use, folder in (("train", train_dir), ("heldout", val_dir)):
        written = prepare_folder(manifest, use, folder, cache_dir)
        counts[folder] = len(manifest.select(use))
        if written:
            log(f"wrote {len(written)} of {counts[folder]} {use} images to {folder}")
    return counts


def export(config, out_dir: str, log=print) -> float:
    """Export the latest checkpoint's EMA weights (fp16) with ``scaling_factor`` set by the latent-scale rule
    over the training images (computed in fp32), rounded to 5 significant digits as SD's 0.18215 is (an estimate
    over 54 images has no more). Returns the factor written."""
    from klvae.config import AutoencoderKLConfig
    from klvae.config import CONFIG_NAME
    from klvae.torch.train.checkpoint import model_from_checkpoint, resolve_checkpoint
    from klvae.train.latent_scale import model_scaling_factor

    path = resolve_checkpoint(config.train.output_dir)
    model = model_from_checkpoint(path, use_ema=True).float()
    factor, count = model_scaling_factor(model, config.data.train_dir)
    factor = float(f"{factor:.5g}")
    model.half().save_pretrained(out_dir)
    config_path = os.path.join(out_dir, CONFIG_NAME)
    AutoencoderKLConfig.from_json_file(config_path).replace(scaling_factor=factor).to_json_file(config_path)
    log(f"exported {path} -> {out_dir}; scaling_factor {factor} (1 / std of the posterior means of {count} "
        f"training images)")
    return factor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klvae.train.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe (TOML)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: the config's)")
    parser.add_argument("--prepare-data", action="store_true", help="fetch the packages and write the data "
                        "folders, then exit")
    parser.add_argument("--cache-dir", default=None, help="Debian package cache (default: debian-cache beside the "
                        "training folder)")
    parser.add_argument("--deb-dir", default=None, help="with --prepare-data: a folder holding the pinned .deb "
                        "files (instead of apt-get download)")
    parser.add_argument("--export", metavar="DIR", help="export the latest checkpoint's EMA weights to DIR (fp16), "
                        "with its own scaling_factor, instead of training")
    parser.add_argument("--latent-scale", metavar="MODEL", nargs="?", const="", default=None,
                        help="print 1 / std of MODEL's posterior means over the training images (default MODEL: "
                        "klvae.DEFAULT_MODEL) and exit")
    args = parser.parse_args(argv)

    from klvae.train.config import load_train_config

    config = load_train_config(args.config)
    if args.export:
        export(config, args.export)
        return 0
    if args.prepare_data or args.latent_scale is not None:
        prepare_data(config.data.train_dir, config.data.val_dir, args.cache_dir, fetch=args.prepare_data,
                     deb_dir=args.deb_dir)
    if args.prepare_data:
        return 0
    if args.latent_scale is not None:
        from klvae.torch.train.evaluation import load_any_model
        from klvae.train.latent_scale import model_scaling_factor

        model = load_any_model(args.latent_scale or None)
        factor, count = model_scaling_factor(model, config.data.train_dir)
        print(f"scaling_factor {factor:.5f} (1 / std of the posterior means over {count} images in "
              f"{config.data.train_dir}); the model's config has {model.config.scaling_factor}")
        return 0
    prepare_data(config.data.train_dir, config.data.val_dir, args.cache_dir)
    from klvae.torch.train.trainer import Trainer

    with Trainer(config) as trainer:
        trainer.fit(args.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
