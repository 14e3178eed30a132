"""``klvae serve``: serve a model over HTTP for diffusers' ``remote_decode``/``remote_encode``.

POST /decode, POST /encode, POST /roundtrip, GET / (a page to try the model in a browser), GET /health
(liveness), GET /ready (readiness), GET /info and GET /metrics (Prometheus) on 127.0.0.1 by default. Without
--model it serves the bundled default model. Stop with Ctrl-C or SIGTERM: requests in flight finish first.
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
    p.add_argument("--model", default=None,
                   help="a diffusers AutoencoderKL folder (config.json + weights); default: the bundled default model")
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
    p.add_argument("--protect-metrics", action="store_true",
                   help="require the token on /metrics, /health and /ready too (by default they are open, for "
                        "scrapers and probes)")
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="no Prometheus instruments and no /metrics")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="report ready without first running the model once")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from klvae.serve.app import ServeSettings, create_app
    from klvae.serve.engine import Engine
    from klvae.serve.errors import ServeError
    from klvae.serve.runner import serve

    try:
        settings = ServeSettings(token=args.token or os.environ.get(TOKEN_ENV) or None, max_pixels=args.max_pixels,
                                 max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                                 max_queue=args.max_queue, protect_metrics=args.protect_metrics,
                                 metrics=args.metrics, warmup=args.warmup)
    except ValueError as e:
        raise ServeError(str(e)) from None
    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port} is not a TCP port")
    if not _is_loopback(args.host) and settings.token is None:
        print(f"klvae: warning: listening on {args.host} without --token: anyone who can reach it can use it",
              file=sys.stderr)
    if args.protect_metrics and settings.token is None:
        raise ServeError("--protect-metrics needs a token (--token or $" + TOKEN_ENV + ")")
    folder, name = _model_folder(args.model)
    engine = Engine.from_folder(folder, device=args.device, dtype=args.dtype, tiling=args.tiling, name=name)
    serve(create_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _model_folder(model: str | None) -> tuple[str, str]:
    """``--model``: a folder, or the bundled default model when absent (or ``default``, unless such a folder
    exists)."""
    from klvae.cli.common import DEFAULT_MODEL_NAME, default_model

    if model is None or (model == DEFAULT_MODEL_NAME and not os.path.isdir(model)):
        return default_model(), DEFAULT_MODEL_NAME
    return model, model


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
