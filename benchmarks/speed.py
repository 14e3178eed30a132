"""Decode/encode speed, memory and accuracy: klvae against diffusers, same (seeded random) SD-config weights.

    python benchmarks/speed.py --sizes 256,512,1024 --dtypes fp32,bf16,fp16 --ops decode,encode
    python benchmarks/speed.py table --log benchmarks/speed_results.jsonl

For each op, size and dtype it runs, each in its own subprocess (so peak RSS belongs to one configuration):

- ``diffusers``: ``AutoencoderKL.to(dtype)`` and nothing else;
- ``diffusers+cl``: the same plus ``channels_last`` on model and input (diffusers' documented manual speed-up);
- ``klvae``: ``AutoencoderKL.to(dtype)`` and nothing else (it picks its compute dtype and layout itself);
- ``klvae+compile`` (``--compile``): ``torch.compile(vae.decode)``, inductor, static shapes; the compile time
  is reported separately.

Reported per run: median of ``--repeats`` timed calls after one warm-up, effective GFLOP/s (the architecture's
nominal FLOPs, counted once with torch's FlopCounterMode on diffusers' model, divided by the time), that rate as a
share of this machine's GEMM peak in the same dtype (measured at the start of the run), peak RSS, and the
relative error (max |out - ref| / max |ref|) against diffusers' float32 output. A configuration whose predicted
time (from the same implementation at a smaller size, scaled by FLOPs) exceeds ``--max-seconds`` is not run and
says so; one whose warm-up alone exceeds it is timed once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                 norm_num_groups=32, sample_size=512)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
IMPLS = ("diffusers", "diffusers+cl", "klvae")
_STARTUP_SECONDS = 45.0  # a run's imports and model build, at most (a timed-out first call took the rest)


def _inputs(op: str, size: int, torch):
    g = torch.Generator().manual_seed(1234)
    if op == "decode":
        return torch.randn(1, 4, size // 8, size // 8, generator=g)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1


def _build(impl: str, torch):
    from klvae.torch.model import AutoencoderKL

    torch.manual_seed(0)
    ours = AutoencoderKL(**SD_CONFIG).eval()
    if impl.startswith("klvae"):
        return ours
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    theirs = DiffusersAutoencoderKL(**SD_CONFIG).eval()
    theirs.load_state_dict(ours.state_dict())
    return theirs


def nominal_flops(op: str, size: int) -> int:
    """FLOPs of diffusers' SD-config model for one image (convolutions, matmuls, attention), counted on meta."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    with torch.device("meta"):
        model = DiffusersAutoencoderKL(**SD_CONFIG).eval()
        x = _inputs_meta(op, size, torch)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.decode(x) if op == "decode" else model.encode(x)
    return counter.get_total_flops()


def _inputs_meta(op: str, size: int, torch):
    shape = (1, 4, size // 8, size // 8) if op == "decode" else (1, 3, size, size)
    return torch.empty(shape, device="meta")


def gemm_peak(dtype_name: str, budget: float = 2.0) -> float:
    """GFLOP/s of a square matmul in ``dtype``, the size grown until one product takes ~budget/4 seconds."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    n, rate = 256, 0.0
    while n <= 4096:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rate = max(rate, 2 * n ** 3 / t / 1e9)
        if t > budget / 4:
            break
        n *= 2
    return rate


def run_one(args) -> dict:
    import numpy as np
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    model = _build(args.impl, torch).to(dtype)
    x = _inputs(args.op, args.size, torch).to(dtype)
    if args.impl == "diffusers+cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if args.op == "decode":
        call = lambda v: model.decode(v).sample  # noqa: E731
    else:
        call = lambda v: model.encode(v).latent_dist.mean  # noqa: E731
    compile_seconds = None
    if args.impl == "klvae+compile":
        call = torch.compile(call, fullgraph=True, dynamic=False)
    times, cpu_times = [], []   # wall, and CPU time of all threads (less sensitive to other jobs on the machine)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = call(x)
        first = time.perf_counter() - t0
        if args.impl == "klvae+compile":
            compile_seconds = first
        if first > args.max_seconds and args.impl != "klvae+compile":
            times = [first]
        else:
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                out = call(x)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        check = time.perf_counter()
        finite = bool(torch.isfinite(out).all())
        finite_check_seconds = time.perf_counter() - check
    os.makedirs(args.outputs, exist_ok=True)
    path = os.path.join(args.outputs, f"{args.op}_{args.size}_{args.impl}_{args.dtype}.npy")
    np.save(path, out.float().numpy())
    return dict(impl=args.impl, dtype=args.dtype, op=args.op, size=args.size, seconds=statistics.median(times),
                cpu_seconds=statistics.median(cpu_times) if cpu_times else None,
                runs=len(times), compile_seconds=compile_seconds, finite=finite,
                finite_check_seconds=round(finite_check_seconds, 5),
                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                threads=torch.get_num_threads(), torch=torch.__version__)


def sweep(args) -> None:
    import numpy as np

    impls = list(IMPLS) + (["klvae+compile"] if args.compile else [])
    peaks = {d: gemm_peak(d) for d in args.dtypes.split(",")}
    print("GEMM peak GFLOP/s:", {k: round(v, 1) for k, v in peaks.items()}, flush=True)
    measured: dict[tuple, dict] = {}
    for op in args.ops.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            flops = nominal_flops(op, size)
            # diffusers float32 first: it is the reference of every other run.
            order = [("diffusers", "fp32")] + [(i, d) for d in args.dtypes.split(",") for i in impls
                                                if (i, d) != ("diffusers", "fp32")
                                                and (i != "diffusers+cl" or d in args.cl_dtypes.split(","))
                                                and (not args.only or f"{i}:{d}" in args.only.split(","))]
            for impl, dtype in order:
                record = dict(impl=impl, dtype=dtype, op=op, size=size, flops=flops)
                smaller = [r for k, r in measured.items() if k[:3] == (impl, dtype, op) and _seconds(r)]
                predicted = max((_seconds(r) * flops / r["flops"] for r in smaller), default=0.0)
                if predicted > args.max_seconds * (1 if impl != "klvae+compile" else 4):
                    record["skipped"] = (f"predicted {predicted:.0f} s from size {smaller[-1]['size']} "
                                         f"(> --max-seconds {args.max_seconds:.0f})")
                else:
                    cmd = [sys.executable, __file__, "run", "--impl", impl, "--dtype", dtype, "--op", op,
                           "--size", str(size), "--repeats", str(args.repeats), "--max-seconds",
                           str(args.max_seconds), "--outputs", args.outputs]
                    # A call over --max-seconds is timed once; so only a first call of more than this stops here.
                    limit = (args.repeats + 1) * args.max_seconds + _STARTUP_SECONDS
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
                    except subprocess.TimeoutExpired:
                        proc = None
                        record["timed_out_after"] = limit   # start-up and the warm-up call took longer
                    if proc is None:
                        pass
                    elif proc.returncode:
                        record["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                    else:
                        record.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                        record["gflops"] = flops / record["seconds"] / 1e9
                        record["gemm_peak_gflops"] = peaks[dtype]
                        record["share_of_peak"] = record["gflops"] / peaks[dtype]
                        ref = os.path.join(args.outputs, f"{op}_{size}_diffusers_fp32.npy")
                        out = os.path.join(args.outputs, f"{op}_{size}_{impl}_{dtype}.npy")
                        if os.path.exists(ref):
                            a, b = np.load(out), np.load(ref)
                            record["rel_err"] = float(np.abs(a - b).max() / np.abs(b).max())
                record.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs", date=time.strftime("%Y-%m-%d"))
                measured[(impl, dtype, op, size)] = record
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    table(args)


def _seconds(r: dict) -> float | None:
    """The measured time, or the lower bound a timed-out run gives (its first call was not done in it)."""
    return r.get("seconds") or (r["timed_out_after"] - _STARTUP_SECONDS if "timed_out_after" in r else None)


def table(args) -> None:
    with open(args.log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    latest = {(r["impl"], r["dtype"], r["op"], r["size"]): r for r in records}
    print("| op | size | dtype | implementation | median s | GFLOP/s | share of GEMM peak | peak RSS MiB | "
          "rel. err vs fp32 | diffusers best / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(latest, key=lambda k: (k[2], k[3], list(DTYPES).index(k[1]), k[0])):
        r = latest[key]
        label = f"| {r['op']} | {r['size']} | {r['dtype']} | {r['impl']} |"
        if "timed_out_after" in r:
            print(f"{label} > {_seconds(r):.0f} (stopped: first call unfinished) "
                  f"| < {r['flops'] / _seconds(r) / 1e9:.1f} | | | | |")
            continue
        if "seconds" not in r:
            print(f"{label} {r.get('skipped') or 'failed: ' + r.get('error', '?')} | | | | | |")
            continue
        best = [latest.get((i, r["dtype"], r["op"], r["size"])) for i in ("diffusers", "diffusers+cl")]
        best = [b for b in best if b and _seconds(b)]
        speedup = ""
        if best and r["impl"].startswith("klvae"):
            fastest = min(best, key=_seconds)
            bound = "> " if "timed_out_after" in fastest else ""
            speedup = f"{bound}{_seconds(fastest) / r['seconds']:.2f}x"
        once = " (1 run)" if r.get("runs") == 1 else ""
        compiled = f" (+{r['compile_seconds']:.0f} s compile)" if r.get("compile_seconds") else ""
        print(f"{label} {r['seconds']:.2f}{once}{compiled} | {r['gflops']:.1f} | {100 * r['share_of_peak']:.0f} % | "
              f"{r['peak_rss_mib']} | {r.get('rel_err', float('nan')):.1e} | {speedup} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("run", help="one configuration in this process; prints a JSON line")
    one.add_argument("--impl", choices=IMPLS + ("klvae+compile",), required=True)
    one.add_argument("--dtype", choices=tuple(DTYPES), required=True)
    one.add_argument("--op", choices=("decode", "encode"), required=True)
    one.add_argument("--size", type=int, required=True)
    one.add_argument("--repeats", type=int, default=3)
    one.add_argument("--max-seconds", type=float, default=300.0)
    one.add_argument("--outputs", default="/tmp/klvae_speed_outputs")
    tab = sub.add_parser("table", help="the markdown table of --log")
    tab.add_argument("--log", default="benchmarks/speed_results.jsonl")
    for p in (parser,):
        p.add_argument("--sizes", default="256,512,1024")
        p.add_argument("--dtypes", default="fp32,bf16,fp16")
        p.add_argument("--ops", default="decode,encode")
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--cl-dtypes", default="bf16,fp16", help="dtypes to run diffusers+cl in (in float32 on "
                       "the CPU channels_last measured no faster, and its GroupNorm loses precision)")
        p.add_argument("--only", default="", help="impl:dtype,... to run (default: all; diffusers:fp32, the "
                       "reference, always runs)")
        p.add_argument("--compile", action="store_true", help="also klvae under torch.compile (inductor)")
        p.add_argument("--max-seconds", type=float, default=300.0, help="per-run time budget (see above)")
        p.add_argument("--log", default="benchmarks/speed_results.jsonl")
        p.add_argument("--outputs", default="/tmp/klvae_speed_outputs")
    args = parser.parse_args()
    if args.command == "run":
        print(json.dumps(run_one(args)))
    elif args.command == "table":
        table(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
