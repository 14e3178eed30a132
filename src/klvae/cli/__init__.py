"""The ``klvae`` command line: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import importlib
import sys

from klvae import __version__
from klvae.errors import KLVAEError

# Each module defines ``register(subparsers)``, which adds its subcommand and sets ``func`` to run it;
# ``func(args)`` returns the exit status. Modules are imported only to register, so keep their imports lazy.
SUBCOMMAND_MODULES = [
    "klvae.cli.presets",
    "klvae.cli.train",
    "klvae.cli.eval",
    "klvae.cli.convert",
    "klvae.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klvae", description="The KL-regularised image autoencoder (AutoencoderKL).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"klvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 a klvae error, reported in one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KLVAEError as e:
        print(f"klvae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
