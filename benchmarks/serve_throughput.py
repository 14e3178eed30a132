"""Throughput of `klvae serve` on loopback: one client at a time against 8 concurrent clients (micro-batched).

Starts `klvae serve` as a subprocess (the real command, so client and server do not share a GIL), sends decode
requests the way diffusers' remote_decode does, and reports requests per second for:

  sequential   one client, one request at a time (the server never has two requests to batch);
  concurrent   --clients clients at once, server batching up to --max-batch;
  no batching  the same concurrent clients against a server started with --max-batch 1 (the ablation that
               separates batching from mere overlap of HTTP work and model work).

Both servers run side by side; each round times the three cases back to back and the speedups reported are
medians of the per-round ratios, so background load on the machine hits all cases alike. Example:

    python benchmarks/serve_throughput.py --size 64 --clients 8 --requests 48 --rounds 3

``--metrics-overhead`` instead measures what the Prometheus metrics cost per request: a server with metrics
and one started with ``--no-metrics``, side by side, one client at a time and --clients at once, in alternating
rounds (wall req/s and server CPU ms per request, medians); plus the instruments' own cost per request timed
in-process (the ASGI middleware around a no-op app, and one batch observation), which other load on the
machine disturbs far less:

    python benchmarks/serve_throughput.py --metrics-overhead --size 32 --requests 96 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests

from klvae.serve.probe import wait_until_answering

CONFIGS = {
    # SD-shaped (4 blocks, 2 resnets per block, f = 8) at a quarter of SD's width: big enough that a batch-1
    # decode is dominated by per-layer work a batch shares, small enough for a CPU.
    "quarter-sd": dict(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, layers_per_block=2),
    "sd": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, layers_per_block=2),
}


def build_model(name: str, folder: str) -> dict:
    import torch

    from klvae.torch.model import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**CONFIGS[name])
    model.save_pretrained(folder)
    return {"parameters": model.num_parameters(), "factor": model.config.downsample_factor,
            "latent_channels": model.config.latent_channels}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`klvae serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, max_batch: int, extra: list[str]):
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "klvae.serve", "--model", model, "--port", str(self.port),
               "--max-batch", str(max_batch), "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until_answering(f"{self.url}/health", self.proc, 180)

    def cpu_s(self) -> float | None:
        """CPU time the server process has used (all threads), from /proc; None where there is no /proc."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def info(self) -> dict:
        return requests.get(f"{self.url}/info", timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def make_request(latent_shape: tuple[int, ...], output: str) -> tuple[dict, bytes]:
    z = np.random.default_rng(0).standard_normal(latent_shape).astype(np.float32)
    params = {"shape": list(latent_shape), "dtype": "float32", "scaling_factor": 0.18215}
    params |= {"uint8": dict(output_type="pt", partial_postprocess=True), "pt": dict(output_type="pt"),
               "png": dict(output_type="pil", image_format="png"),
               "jpg": dict(output_type="pil", image_format="jpg")}[output]
    return params, z.tobytes()


def run_clients(url: str, clients: int, total: int, params: dict, body: bytes) -> float:
    """Send ``total`` decode requests from ``clients`` threads (closed loop); return requests per second."""
    per_client = [total // clients + (i < total % clients) for i in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        with requests.Session() as session:
            barrier.wait()
            for _ in range(n):
                r = session.post(f"{url}/decode", params=params, data=body, timeout=300)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return total / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quarter-sd", choices=sorted(CONFIGS), help="random-weight model to serve")
    p.add_argument("--model", help="serve this diffusers folder instead of a random --config model")
    p.add_argument("--size", type=int, default=64, help="decoded image side in pixels")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests per timed run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--output", default="uint8", choices=["uint8", "pt", "png", "jpg"],
                   help="uint8: output_type=pt + partial_postprocess")
    p.add_argument("--no-ablation", action="store_true", help="skip the --max-batch 1 concurrent run")
    p.add_argument("--server-args", default="", help="extra `klvae serve` arguments, e.g. '--device cuda'")
    p.add_argument("--metrics-overhead", action="store_true",
                   help="compare a server with Prometheus metrics against one with --no-metrics")
    args = p.parse_args()
    if args.metrics_overhead:
        metrics_overhead(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = args.model
            with open(os.path.join(folder, "config.json")) as f:
                cfg = json.load(f)
            meta = {"parameters": None, "factor": 2 ** (len(cfg["block_out_channels"]) - 1),
                    "latent_channels": cfg.get("latent_channels", 4)}
        else:
            folder = os.path.join(tmp, "model")
            meta = build_model(args.config, folder)
        f = meta["factor"]
        latent_shape = (1, meta["latent_channels"], args.size // f, args.size // f)
        params, body = make_request(latent_shape, args.output)
        extra = args.server_args.split()

        servers = {"batched": Server(folder, args.max_batch, extra)}
        if not args.no_ablation:
            servers["unbatched"] = Server(folder, 1, extra)
        runs: dict[str, list[float]] = {"sequential": [], "concurrent": [], "no_batching": []}
        cpu: dict[str, list[float]] = {"sequential": [], "concurrent": [], "no_batching": []}  # server CPU s/request
        batches = items = 0

        def timed(case: str, server: Server, clients: int, total: int) -> None:
            start = server.cpu_s()
            runs[case].append(run_clients(server.url, clients, total, params, body))
            if start is not None:
                cpu[case].append((server.cpu_s() - start) / total)

        try:
            for server in servers.values():  # warm-up: every batch size the timed runs will see
                for clients in (1, args.clients, args.clients):
                    run_clients(server.url, clients, 2 * args.clients, params, body)
            # Each round times the three cases back to back, so a change in background load hits them alike;
            # the speedups are medians of the per-round ratios.
            for _ in range(args.rounds):
                batched = servers["batched"]
                timed("sequential", batched, 1, max(args.requests // 4, 4))
                before = batched.info()["batching"]
                timed("concurrent", batched, args.clients, args.requests)
                after = batched.info()
                batches += after["batching"]["batches"] - before["batches"]
                items += after["batching"]["items"] - before["items"]
                if "unbatched" in servers:
                    timed("no_batching", servers["unbatched"], args.clients, args.requests)
        finally:
            for server in servers.values():
                server.stop()

    seq, conc, unb = runs["sequential"], runs["concurrent"], runs["no_batching"]
    speedups = [c / s for s, c in zip(seq, conc)]
    result = {
        "model": args.model or args.config, "parameters": meta["parameters"], "image": f"{args.size}x{args.size}",
        "latents": list(latent_shape), "output": args.output, "clients": args.clients, "max_batch": args.max_batch,
        "device": after["model"]["device"], "dtype": after["model"]["dtype"], "torch_threads": _torch_threads(),
        "sequential_rps": round(statistics.median(seq), 2), "concurrent_rps": round(statistics.median(conc), 2),
        "speedup": round(statistics.median(speedups), 2),
        "mean_batch_concurrent": round(items / batches, 2) if batches else None,
        "sequential_runs": [round(v, 2) for v in seq], "concurrent_runs": [round(v, 2) for v in conc],
        "speedup_runs": [round(v, 2) for v in speedups],
    }
    if unb:
        over = [c / u for u, c in zip(unb, conc)]
        result |= {"no_batching_rps": round(statistics.median(unb), 2),
                   "batching_over_no_batching": round(statistics.median(over), 2),
                   "no_batching_runs": [round(v, 2) for v in unb]}
    if cpu["sequential"]:  # CPU time is far less sensitive than wall time to other jobs on the machine
        result["server_cpu_ms_per_request"] = {k: round(1000 * statistics.median(v), 1) for k, v in cpu.items() if v}
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    for key, value in result.items():
        print(f"{key}: {json.dumps(value)}")
    print(f"\n{args.clients} clients vs one at a time: {result['speedup']:.2f}x (median of per-round ratios; "
          f"{result['concurrent_rps']:.2f} vs {result['sequential_rps']:.2f} req/s, mean batch "
          f"{result['mean_batch_concurrent']})" + (f"; batching vs no batching at {args.clients} clients: "
                                                  f"{result['batching_over_no_batching']:.2f}x" if unb else ""))


def metrics_overhead(args: argparse.Namespace) -> None:
    """Servers with and without metrics, timed in alternating rounds; plus the in-process cost of the instruments."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or os.path.join(tmp, "model")
        meta = {"factor": 8, "latent_channels": 4} if args.model else build_model(args.config, folder)
        f = meta["factor"]
        latent_shape = (1, meta["latent_channels"], args.size // f, args.size // f)
        params, body = make_request(latent_shape, args.output)
        extra = args.server_args.split()
        servers = {"metrics": Server(folder, args.max_batch, extra),
                   "no_metrics": Server(folder, args.max_batch, extra + ["--no-metrics"])}
        cases = {(name, clients): [] for name in servers for clients in (1, args.clients)}
        cpu = {key: [] for key in cases}
        try:
            for server in servers.values():
                run_clients(server.url, args.clients, 2 * args.clients, params, body)  # warm-up
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                for clients in (1, args.clients):
                    for name in order:
                        server = servers[name]
                        start = server.cpu_s()
                        cases[name, clients].append(run_clients(server.url, clients, args.requests, params, body))
                        if start is not None:
                            cpu[name, clients].append((server.cpu_s() - start) / args.requests)
            scraped = requests.get(f"{servers['metrics'].url}/metrics", timeout=30).text
        finally:
            for server in servers.values():
                server.stop()
    result: dict = {"model": args.model or args.config, "image": f"{args.size}x{args.size}", "output": args.output,
                    "requests_per_run": args.requests, "rounds": args.rounds, "torch_threads": _torch_threads(),
                    "metrics_exposition_bytes": len(scraped)}
    for clients in (1, args.clients):
        on, off = cases["metrics", clients], cases["no_metrics", clients]
        row = {"rps_metrics": round(statistics.median(on), 2), "rps_no_metrics": round(statistics.median(off), 2),
               "rps_ratio": round(statistics.median([a / b for a, b in zip(on, off)]), 3)}
        if cpu["metrics", clients]:
            c_on, c_off = cpu["metrics", clients], cpu["no_metrics", clients]
            row |= {"cpu_ms_metrics": round(1000 * statistics.median(c_on), 3),
                    "cpu_ms_no_metrics": round(1000 * statistics.median(c_off), 3),
                    "cpu_ms_difference": round(1000 * statistics.median([a - b for a, b in zip(c_on, c_off)]), 3)}
        result[f"clients_{clients}"] = row
    result["in_process_us_per_request"] = instrument_cost_us()
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    for key, value in result.items():
        print(f"{key}: {json.dumps(value)}")


def instrument_cost_us(n: int = 20000) -> dict[str, float]:
    """Microseconds per request that the metrics add in-process: the ASGI middleware around a no-op app (counter,
    latency histogram, in-flight gauge), one batch observation (model-time and batch-size histograms), and rendering
one scrape with every route labelled (paid per scrape, not per request)."""
    import asyncio

    from klvae.serve.metrics import Metrics, MetricsMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        pass

    async def receive():
        return {"type": "http.request", "body": b""}

    metrics = Metrics(["/decode"], process=False)
    wrapped = MetricsMiddleware(app, metrics)
    scope = {"type": "http", "path": "/decode", "method": "POST"}

    async def loop(target) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await target(scope, receive, send)
        return time.perf_counter() - start

    def best(target) -> float:
        return min(asyncio.run(loop(target)) for _ in range(5))

    bare, with_middleware = best(app), best(wrapped)
    start = time.perf_counter()
    for _ in range(n):
        metrics.observe_batch("decode", 1, 0.01)
    batch = time.perf_counter() - start
    for route in ("/encode", "/roundtrip", "/health", "/ready", "/info", "/metrics", "/", "other"):
        metrics.requests.labels(route, "200").inc()
        metrics.latency.labels(route).observe(0.01)
    start = time.perf_counter()
    for _ in range(100):
        metrics.render()
    scrape = (time.perf_counter() - start) / 100
    return {"middleware": round(1e6 * (with_middleware - bare) / n, 2), "batch_observation": round(1e6 * batch / n, 2),
            "one_scrape_render": round(1e6 * scrape, 1)}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
