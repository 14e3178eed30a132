"""The ``klvae`` command line: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import importlib
import os
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
    "klvae.cli.encode",
    "klvae.cli.decode",
    "klvae.cli.roundtrip",
    "klvae.cli.info",
    "klvae.cli.cache",
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
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted).

    Bad input (a :class:`KLVAEError`, a file that cannot be read or written, running out of memory) is
    reported in one line without a traceback; ``KLVAE_DEBUG=1`` shows the traceback. Anything else is a bug
    and keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("klvae: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (``klvae info | head``): not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (KLVAEError, OSError, MemoryError) as e:
        if os.environ.get("KLVAE_DEBUG"):
            raise
        print(f"klvae: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError" or os.environ.get("KLVAE_DEBUG"):
            raise
        print(f"klvae: error: out of memory ({_one_line(e)}); try --tiling or a smaller --batch-size",
              file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The error's message on one line (multi-line messages, such as key lists, joined with '; ')."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, KLVAEError):
        where = e.filename if e.filename is not None else ""
        text = f"{where}: {e.strerror}" if where else e.strerror
    else:
        text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
