"""``klvae serve``: serve a model over HTTP for diffusers' ``remote_decode``/``remote_encode``.

POST /decode, POST /encode, GET /health, GET /info on 127.0.0.1 by default. Stop with Ctrl-C or SIGTERM:
requests in flight finish first.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

TOKEN_ENV = "KLVAE_SERVE_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve encode/decode over HTTP (diffusers' remote VAE protocol)",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m klvae.serve``: the same command without the rest of the command line."""
    from klvae.errors import KLVAEError

    p = argparse.ArgumentParser(prog="python -m klvae.serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except KLVAEError as e:
        print(f"klvae serve: error: {e}", file=sys.stderr)
        return 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a diffusers AutoencoderKL folder (config.json + weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or the token as Basic auth password); "
                                   f"without this option, ${TOKEN_ENV} if set")
    p.add_argument("--max-pixels", type=int, default=4 * 2048 * 2048,
                   help="largest batch x height x width (image pixels) one request may decode or encode")
    p.add_argument("--max-batch", type=int, default=8, help="most items run on the model at once")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="while requests arrive together, how long the oldest waits for others of its shape to "
                        "join its batch (on slow devices up to a tenth of the recent batch time); 0: never wait")
    p.add_argument("--max-queue", type=int, default=64, help="most items waiting; beyond it requests get 503")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ...")
    p.add_argument("--tiling", action="store_true", help="decode/encode large images in tiles (less memory)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from klvae.serve.app import ServeSettings, create_app
    from klvae.serve.engine import Engine
    from klvae.serve.errors import ServeError
    from klvae.serve.runner import serve

    try:
        settings = ServeSettings(token=args.token or os.environ.get(TOKEN_ENV) or None, max_pixels=args.max_pixels,
                                 max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                                 max_queue=args.max_queue)
    except ValueError as e:
        raise ServeError(str(e)) from None
    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port} is not a TCP port")
    if not _is_loopback(args.host) and settings.token is None:
        print(f"klvae: warning: listening on {args.host} without --token: anyone who can reach it can use it",
              file=sys.stderr)
    engine = Engine.from_folder(args.model, device=args.device, dtype=args.dtype, tiling=args.tiling)
    serve(create_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
