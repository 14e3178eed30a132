"""Time and peak RSS of decode/encode against resolution: klvae untiled, blend and exact tiling, and diffusers
untiled and tiled, with the same (seeded random) weights, fp32, on the CPU: SD's architecture (``--arch sd``,
the default) or FLUX.2's (``--arch flux2``: AutoencoderKLFlux2 against diffusers' AutoencoderKLFlux2).

Every configuration runs in its own subprocess, so each peak RSS belongs to one operation alone:

    python benchmarks/tiling_bench.py sweep --sizes 512,1024,2048 --log benchmarks/tiling_results.jsonl
    python benchmarks/tiling_bench.py table --log benchmarks/tiling_results.jsonl

``sweep`` appends one JSON line per finished run to the log and skips runs already there, so it can be stopped
and resumed. Each run saves its output under ``--outputs`` (``.npy``) so that ``table`` can report the relative
error of every result against klvae's untiled one of the same size (where that run fitted in memory).
One run by hand: ``python benchmarks/tiling_bench.py run --impl klvae --mode exact --op decode --size 1024``.
Distributed exact tiling (issue 18) on N CPU ranks under torchrun (gloo, one thread each), one record with every
rank's peak RSS; ``compare`` gives the relative error between two saved outputs:

    python benchmarks/tiling_bench.py dist --ranks 2 --op decode --size 2048 --log benchmarks/tiling_results.jsonl
    python benchmarks/tiling_bench.py sweep --sizes 2048 --ops decode --runs klvae:exact --again
    python benchmarks/tiling_bench.py compare /tmp/klvae_tiling_outputs/decode_2048_klvae_distributed_t512.npy \
        /tmp/klvae_tiling_outputs/decode_2048_klvae_exact_t512.npy
FLUX.2, where diffusers' tiles follow its sample_size of 1024 (a user must set 512 to tile a 1024 image):

    python benchmarks/tiling_bench.py sweep --arch flux2 --sizes 1024,2048 --ops decode \
        --runs klvae:untiled,klvae:exact,diffusers:untiled --log benchmarks/flux2_results.jsonl
    python benchmarks/tiling_bench.py sweep --arch flux2 --sizes 1024,2048 --ops decode --runs diffusers:tiled \
        --tile 512 --log benchmarks/flux2_results.jsonl
    python benchmarks/tiling_bench.py table --log benchmarks/flux2_results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                 norm_num_groups=32, sample_size=512)
# (klvae class, diffusers class, config fields) per architecture; FLUX.2's fields are its classes' defaults.
ARCHS = {"sd": ("AutoencoderKL", "AutoencoderKL", SD_CONFIG), "flux2": ("AutoencoderKLFlux2", "AutoencoderKLFlux2", {})}
RUNS = [("klvae", "untiled"), ("klvae", "exact"), ("klvae", "blend"), ("diffusers", "untiled"),
        ("diffusers", "tiled")]


def _config(arch: str):
    import klvae

    ours, _, fields = ARCHS[arch]
    return getattr(klvae, ours).config_class(**fields)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _inputs(op: str, size: int, torch, latent_channels: int = 4):
    g = torch.Generator().manual_seed(1234)
    if op == "decode":
        return torch.randn(1, latent_channels, size // 8, size // 8, generator=g)
    # A smooth synthetic picture in [-1, 1]: gradients, rings and a few discs.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xx ** 2 + yy ** 2).sqrt()
    img = torch.stack([xx, torch.sin(6 * r), yy * xx])
    for cx, cy, rad in ((0.3, -0.2, 0.25), (-0.5, 0.4, 0.15), (0.6, 0.6, 0.1)):
        img[:, ((xx - cx) ** 2 + (yy - cy) ** 2) < rad ** 2] *= -0.5
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(-1, 1)[None]


def run_one(args) -> dict:
    import torch

    import klvae

    rank = 0
    if args.mode == "distributed":  # one rank of a torchrun job
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.manual_seed(0)
    ours_name, theirs_name, fields = ARCHS[args.arch]
    ours = getattr(klvae, ours_name)(**fields).eval()
    if args.impl == "klvae":
        model = ours
    else:
        import diffusers

        model = getattr(diffusers, theirs_name)(**fields).eval()
        model.load_state_dict(ours.state_dict())  # the same seeded weights, through the shared state_dict layout
        del ours
    f = 2 ** (len(model.config.block_out_channels) - 1)
    x = _inputs(args.op, args.size, torch, model.config.latent_channels)
    tiled = args.mode != "untiled"
    if tiled:
        kwargs = {} if args.impl == "diffusers" else {"mode": args.mode}
        if args.memory_limit and args.impl == "klvae":
            kwargs["memory_limit"] = args.memory_limit
        if args.spill:
            kwargs["spill"] = True
        model.enable_tiling(**kwargs)
        if args.tile:
            model.tile_sample_min_size, model.tile_latent_min_size = args.tile, args.tile // f
    warm = x[..., :64, :64] if args.op == "encode" else x[..., :8, :8]
    with torch.no_grad():
        (model.encode(warm) if args.op == "encode" else model.decode(warm))
        base = _rss_kib()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        if args.op == "decode":
            out = model.decode(x).sample
        else:
            out = model.encode(x).latent_dist.mean
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    record = dict(arch=args.arch, impl=args.impl, mode=args.mode, op=args.op, size=args.size,
                  tile=args.tile or _config(args.arch).sample_height_width[0],
                  memory_limit=args.memory_limit, spill=args.spill, seconds=round(seconds, 2), cpu_seconds=round(cpu, 2),
                  peak_rss_mib=round(peak / 1024),
                  base_rss_mib=round(base / 1024), threads=torch.get_num_threads(), torch=torch.__version__)
    if args.impl == "klvae" and args.mode == "exact" and args.memory_limit:
        # What the plan promised: FLOPs against the untiled computation's, spill files at their largest.
        from klvae.tiling import exact_plan_for

        latent_hw = tuple(s // f for s in x.shape[-2:]) if args.op == "encode" else tuple(x.shape[-2:])
        plan = exact_plan_for(model.config, args.op, latent_hw, x.shape[0], 4, model.tile_sample_min_size,
                              args.memory_limit, None, spill=args.spill)
        record.update(plan_flops_ratio=round(plan.flops / plan.untiled_flops, 3),
                      plan_spill_mib=round(plan.spill_bytes() / 2**20))
    if args.mode == "distributed":
        record.update(rank=rank, world=dist.get_world_size())
        dist.destroy_process_group()
    if args.outputs and rank == 0:
        import numpy as np

        os.makedirs(args.outputs, exist_ok=True)
        np.save(os.path.join(args.outputs, _output_name(record)), out.float().numpy())
    return record


def _output_name(r: dict) -> str:
    limit = f"_lim{r['memory_limit']:.3g}" if r.get("memory_limit") else ""
    limit += "_spill" if r.get("spill") else ""
    arch = "" if r.get("arch", "sd") == "sd" else f"{r['arch']}_"
    return f"{arch}{r['op']}_{r['size']}_{r['impl']}_{r['mode']}_t{r['tile']}{limit}.npy"


def _key(r: dict) -> tuple:
    return (r["impl"], r["mode"], r["op"], int(r["size"]), int(r.get("tile") or 512), r.get("memory_limit"),
            r.get("arch", "sd"), bool(r.get("spill")))


def _reference(latest: dict, r: dict) -> dict | None:
    """klvae's untiled run of the same architecture, operation and size (at the default tile size)."""
    for key, ref in latest.items():
        if (key[:4], key[5:]) == (("klvae", "untiled", r["op"], r["size"]), (None, r.get("arch", "sd"), False)):
            return ref
    return None


def _load(log: str) -> list[dict]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def sweep(args) -> None:
    done = {_key(r) for r in _load(args.log)}
    runs = [tuple(r.split(":")) for r in args.runs.split(",")] if args.runs else RUNS
    for op in args.ops.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for impl, mode in runs:
                limit = args.memory_limit if (impl == "klvae" and mode == "exact") else None
                spill = args.spill and (impl, mode) == ("klvae", "exact")
                tile = args.tile or _config(args.arch).sample_height_width[0]
                key = (impl, mode, op, size, tile, limit, args.arch, spill)
                if key in done and not args.again:
                    continue
                cmd = [sys.executable, __file__, "run", "--arch", args.arch, "--impl", impl, "--mode", mode, "--op",
                       op, "--size", str(size), "--outputs", args.outputs]
                if args.tile:
                    cmd += ["--tile", str(args.tile)]
                if limit:
                    cmd += ["--memory-limit", str(limit)]
                if spill:
                    cmd += ["--spill"]
                run = dict(arch=args.arch, impl=impl, mode=mode, op=op, size=size, tile=tile, memory_limit=limit,
                           spill=spill)
                needed = _estimated_peak_bytes(args.arch, impl, mode, op, size, limit)
                available = _available_bytes()
                if needed > 0.9 * available:  # do not push the machine (shared) into the OOM killer
                    record = dict(run, error=f"not run: needs about {needed / 2**30:.1f} GiB, "
                                             f"{available / 2**30:.1f} GiB available", returncode=None)
                    proc = None
                else:
                    print("running", " ".join(cmd[2:]), flush=True)
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if proc is None:
                    pass
                elif proc.returncode != 0:
                    record = dict(run, error=(proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300],
                                  returncode=proc.returncode)
                else:
                    record = json.loads(proc.stdout.strip().splitlines()[-1])
                record.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                              date=time.strftime("%Y-%m-%d"))
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


def dist_run(args) -> None:
    """One distributed run under torchrun; appends one record: the slowest rank's time, every rank's peak RSS."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}", __file__,
           "run", "--arch", args.arch, "--impl", "klvae", "--mode", "distributed", "--op", args.op, "--size",
           str(args.size), "--outputs", args.outputs]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("running", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    record = {k: v for k, v in ranks[0].items() if k != "rank"}
    record.update(seconds=max(r["seconds"] for r in ranks), cpu_seconds=round(sum(r["cpu_seconds"] for r in ranks), 2),
                  peak_rss_mib=max(r["peak_rss_mib"] for r in ranks),
                  rank_peak_rss_mib=[r["peak_rss_mib"] for r in ranks],
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                  date=time.strftime("%Y-%m-%d"))
    with open(args.log, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def compare(args) -> None:
    import numpy as np

    a, b = np.load(args.actual, mmap_mode="r"), np.load(args.expected, mmap_mode="r")
    print(f"rel. error {float(np.abs(a - b).max() / np.abs(b).max()):.1e}")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _estimated_peak_bytes(arch: str, impl: str, mode: str, op: str, size: int, limit: float | None) -> float:
    """A rough peak (model and libraries included) to decide whether a run can fit the machine now."""
    from klvae.tiling_plan import plan_exact, untiled_estimate

    config = _config(arch)
    latent = (size // 8, size // 8)
    if mode == "untiled":
        peak = untiled_estimate(config, op, latent, 1, 4)[0]
    elif mode == "exact":
        peak = plan_exact(config, op, latent, 1, 4, 32, limit).peak_bytes
    else:  # blend tiles: one 512-pixel tile at a time, plus the tiles kept for blending
        peak = untiled_estimate(config, op, (64, 64), 1, 4)[0] + 2 * 3 * 4 * size * size
    return peak + 0.7 * 2**30


def table(args) -> None:
    import numpy as np

    records = [r for r in _load(args.log) if "seconds" in r or "error" in r]
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[_key(r)] = r

    def rel_err(r: dict) -> str:
        ref = _reference(latest, r)
        if ref is None or "seconds" not in ref or "seconds" not in r:
            return "-"
        try:
            a = np.load(os.path.join(args.outputs, _output_name(r)), mmap_mode="r")
            b = np.load(os.path.join(args.outputs, _output_name(ref)), mmap_mode="r")
        except OSError:
            return "-"
        return f"{float(np.abs(a - b).max() / np.abs(b).max()):.1e}"

    print("| op | size | implementation | mode | time s | x untiled | peak RSS MiB | x untiled | "
          "rel. err vs untiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(latest, key=lambda k: (k[6], k[2], k[3], RUNS.index((k[0], k[1])) if (k[0], k[1]) in RUNS
                                             else 9, k[4])):
        r = latest[key]
        ref = _reference(latest, r)
        mode = r["mode"] + (f" (limit {r['memory_limit'] / 2**30:.1f} GiB)" if r.get("memory_limit") else "")
        mode += " + spill" if r.get("spill") else ""
        mode += f", tile {r['tile']}" if r["mode"] != "untiled" else ""
        if "error" in r:
            print(f"| {r['op']} | {r['size']} | {r['impl']} | {mode} | failed: {r['error'][:60]} | | | | |")
            continue
        t_ratio = m_ratio = "-"
        if ref and "seconds" in ref:
            t_ratio = f"{r['seconds'] / ref['seconds']:.2f}"
            m_ratio = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}"
        print(f"| {r['op']} | {r['size']} | {r['impl']} | {mode} | {r['seconds']:.1f} | {t_ratio} | "
              f"{r['peak_rss_mib']} | {m_ratio} | {rel_err(r)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one measurement in this process; prints a JSON line")
    one.add_argument("--arch", choices=tuple(ARCHS), default="sd")
    one.add_argument("--impl", choices=("klvae", "diffusers"), required=True)
    one.add_argument("--mode", choices=("untiled", "exact", "blend", "tiled", "auto", "distributed"), required=True)
    one.add_argument("--op", choices=("decode", "encode"), required=True)
    one.add_argument("--size", type=int, required=True)
    one.add_argument("--tile", type=int, default=0, help="tile_sample_min_size (default: the config's sample_size)")
    one.add_argument("--memory-limit", type=float, default=None)
    one.add_argument("--spill", action="store_true", help="exact mode: keep what the plan would recompute in spill files")
    one.add_argument("--outputs", default="")
    many = sub.add_parser("sweep", help="every configuration, one subprocess each, appended to --log")
    many.add_argument("--arch", choices=tuple(ARCHS), default="sd")
    many.add_argument("--sizes", default="512,1024,2048")
    many.add_argument("--ops", default="decode,encode")
    many.add_argument("--runs", default="", help="impl:mode,... (default: all five)")
    many.add_argument("--tile", type=int, default=0)
    many.add_argument("--memory-limit", type=float, default=None, help="exact mode's memory_limit, bytes")
    many.add_argument("--spill", action="store_true", help="klvae exact runs keep activations in spill files")
    many.add_argument("--again", action="store_true", help="run even what the log has (the table uses the latest)")
    many.add_argument("--timeout", type=float, default=6 * 3600)
    many.add_argument("--log", default="benchmarks/tiling_results.jsonl")
    many.add_argument("--outputs", default="/tmp/klvae_tiling_outputs")
    tab = sub.add_parser("table", help="markdown table of --log")
    tab.add_argument("--log", default="benchmarks/tiling_results.jsonl")
    tab.add_argument("--outputs", default="/tmp/klvae_tiling_outputs")
    ranks = sub.add_parser("dist", help="distributed exact tiling on --ranks CPU processes under torchrun")
    ranks.add_argument("--arch", choices=tuple(ARCHS), default="sd")
    ranks.add_argument("--ranks", type=int, default=2)
    ranks.add_argument("--op", choices=("decode", "encode"), default="decode")
    ranks.add_argument("--size", type=int, default=2048)
    ranks.add_argument("--timeout", type=float, default=6 * 3600)
    ranks.add_argument("--log", default="benchmarks/tiling_results.jsonl")
    ranks.add_argument("--outputs", default="/tmp/klvae_tiling_outputs")
    cmp = sub.add_parser("compare", help="relative error of one saved output against another")
    cmp.add_argument("actual")
    cmp.add_argument("expected")
    args = parser.parse_args()
    if args.command == "dist":
        dist_run(args)
    elif args.command == "compare":
        compare(args)
    elif args.command == "run":
        print(json.dumps(run_one(args)))
    elif args.command == "sweep":
        sweep(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
