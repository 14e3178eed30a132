"""The recipe of the bundled default model, as one resumable command (run from the repository root)::

    torchrun --standalone --nproc_per_node 2 -m klvae.train.default_model [--config ...] [--max-steps N]
    python -m klvae.train.default_model [--config configs/default_model.toml] [--max-steps N]   # one process
    python -m klvae.train.default_model --export src/klvae/default_model   # EMA weights of the latest checkpoint

It writes scikit-image's bundled photographs (no other package's images: those are evaluation data) as PNGs
into the config's ``train_dir`` and ``val_dir`` (the held-out ones), then trains, resuming when checkpoints exist.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# scikit-image loaders whose images train the default model, and those held out for evaluation.
TRAIN_IMAGES = ("astronaut", "rocket", "retina", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle",
                "colorwheel", "brick", "grass", "gravel", "moon", "text", "coins", "page", "clock", "cell")
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


def prepare_data(train_dir: str, val_dir: str) -> None:
    """Write the training and held-out PNGs that are not there yet, each atomically (so the ranks of a
    ``torchrun`` launch can all call this: none ever reads a half-written file or finds a folder half-filled)."""
    import io

    from PIL import Image

    from klvae.fileio import atomic_write_bytes

    for folder, names in ((train_dir, TRAIN_IMAGES), (val_dir, HELDOUT_IMAGES)):
        os.makedirs(folder, exist_ok=True)
        for name, image in skimage_photos(names).items():
            path = os.path.join(folder, f"{name}.png")
            if os.path.exists(path):
                continue
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klvae.train.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe (TOML)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: the config's)")
    parser.add_argument("--export", metavar="DIR", help="export the latest checkpoint's EMA weights to DIR (fp16) "
                        "instead of training")
    args = parser.parse_args(argv)

    from klvae.train.config import load_train_config

    config = load_train_config(args.config)
    if args.export:
        from klvae.torch.train.export import export_checkpoint

        path = export_checkpoint(config.train.output_dir, args.export, dtype="float16")
        print(f"exported {path} -> {args.export}")
        return 0
    prepare_data(config.data.train_dir, config.data.val_dir)
    from klvae.torch.train.trainer import Trainer

    with Trainer(config) as trainer:
        trainer.fit(args.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
