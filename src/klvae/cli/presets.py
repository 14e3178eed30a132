"""``klvae presets [NAME]``: list the built-in configurations, or print one as diffusers config.json."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the built-in configurations, or print one as diffusers config.json",
                       description=__doc__)
    p.add_argument("name", nargs="?", help="a preset name (sd1, sdxl, sd3, flux, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from klvae.config import PRESETS, preset
    from klvae.latents import describe_convention

    if args.name:
        sys.stdout.write(preset(args.name).to_json_string())
        return 0
    for name, cfg in PRESETS.items():
        print(f"{name:14s} {cfg.class_name:18s} latent_channels={cfg.latent_channels:<3d} "
              f"latents: {describe_convention(cfg)}")
    return 0
