"""Time the jitted Flax model against the PyTorch backend: same config, same weights, float32, one process.

For each image size: encode (image -> posterior moments) and decode (latents -> image), the torch model under
``inference_mode`` and the Flax model AOT-compiled with ``jax.jit(...).lower(...).compile()``. Compile time is
reported on its own; steady-state times are medians of ``--repeats`` runs after one warm-up. FLOP counts come
from XLA's cost analysis of the compiled program (the same arithmetic both backends do), so both rates use them.
The two outputs are compared as a sanity check (they must agree to ~1e-5 relative).

    python benchmarks/flax_vs_torch.py                       # SD 1.x VAE, 256 and 512 px, batch 1
    python benchmarks/flax_vs_torch.py --sizes 256 --repeats 5 --preset sdxl
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
import torch

from klvae.config import preset
from klvae.flax import FlaxAutoencoderKL
from klvae.torch import AutoencoderKL
from klvae.weights.flax import canonical_to_flax


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd1", help="architecture (random weights): sd1, sdxl, sd3, flux, ...")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compile_flax(fn, *args):
    """AOT-compile ``fn`` for ``args``; returns (compiled, lower seconds, compile seconds, flops)."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, lowered_at - start, compiled_at - lowered_at, float((cost or {}).get("flops", float("nan")))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    args = parse_args()
    config = preset(args.preset)
    torch.manual_seed(args.seed)
    torch_model = AutoencoderKL(config=config).eval()
    model = FlaxAutoencoderKL.from_config(config)
    params = jax.device_put(canonical_to_flax(torch_model.state_dict(), config))
    f = config.downsample_factor

    def encode(p, x):
        return model.apply({"params": p}, x, method="encode").latent_dist.parameters

    def decode(p, z):
        return model.apply({"params": p}, z, method="decode").sample

    print(f"# {args.preset}: {sum(p.numel() for p in torch_model.parameters()):,} parameters, float32, "
          f"batch {args.batch}, median of {args.repeats}")
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
          f"({jax.devices()[0].platform}), {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print("| op | size | torch | flax (jit) | torch / flax | flax compile (lower + compile) | GFLOP | "
          "torch GFLOP/s | flax GFLOP/s | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for size in args.sizes:
        x = (rng.random((args.batch, config.in_channels, size, size), np.float32) * 2 - 1)
        z = rng.standard_normal((args.batch, config.latent_channels, size // f, size // f)).astype(np.float32)
        for name, fn, torch_fn, data in (
                ("encode", encode, lambda t: torch_model.encode(t).latent_dist.parameters, x),
                ("decode", decode, lambda t: torch_model.decode(t).sample, z)):
            t_in = torch.from_numpy(data)
            j_in = jax.device_put(data)
            with torch.inference_mode():
                torch_out = torch_fn(t_in)
                torch_times = timed(lambda: torch_fn(t_in), args.repeats)
            compiled, lower_s, compile_s, flops = compile_flax(fn, params, j_in)
            flax_out = compiled(params, j_in)
            flax_times = timed(lambda: compiled(params, j_in).block_until_ready(), args.repeats)
            t_med, j_med = statistics.median(torch_times), statistics.median(flax_times)
            print(f"| {name} | {size} | {t_med:.3g} s | {j_med:.3g} s | {t_med / j_med:.2f}x | "
                  f"{lower_s + compile_s:.1f} s ({lower_s:.1f} + {compile_s:.1f}) | {flops / 1e9:.1f} | "
                  f"{flops / 1e9 / t_med:.1f} | {flops / 1e9 / j_med:.1f} | "
                  f"{rel_err(flax_out, torch_out.numpy()):.1e} |", flush=True)
    print(f"# load average at the end (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
