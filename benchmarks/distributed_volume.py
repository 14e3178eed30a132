"""Communication of distributed exact tiling, from the plan alone (nothing runs): per decode and encode of one
image, SD's architecture (block_out_channels 128/256/512/512, 2 layers per block), fp32, on N ranks.

    python benchmarks/distributed_volume.py --sizes 2048,4096 --ranks 2,4,8

Prints a markdown table: halo bytes sent point to point (all ranks together, and the most one rank receives),
the gathers of GroupNorm moments (count, bytes), the whole nodes completed on every rank (the attention's input
and output, the output image; bytes one rank receives), the most arithmetic one rank does against a single
process's (load balance and halo recomputation), and a time model for GPUs (see --tflops, --gbps).
"""

from __future__ import annotations

import argparse

from klvae import AutoencoderKL
from klvae.tiling import exact_plan_for
from klvae.tiling_shares import rank_flops, spread, volume

SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                 norm_num_groups=32, sample_size=512)


def attention_flops(channels: int, n: int, queries: int) -> float:
    """q and output projections and the scores for ``queries`` rows; k and v projections for all ``n``."""
    return 2.0 * channels * channels * (2 * queries + 2 * n) + 4.0 * queries * n * channels


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--ranks", default="2,4,8")
    parser.add_argument("--ops", default="decode,encode")
    parser.add_argument("--tflops", type=float, default=50.0,
                        help="achieved TFLOP/s of one GPU on the convolutions (fp32 with TF32 matmuls)")
    parser.add_argument("--gbps", default="450,25",
                        help="link bandwidths to model, GB/s one way per GPU (NVLink 4: ~450; PCIe 4 x16: ~25)")
    args = parser.parse_args()
    config = AutoencoderKL.config_class(**SD_CONFIG)
    links = [float(g) for g in args.gbps.split(",")]
    print("| op | size | N | halo MiB (total) | halo MiB (max one rank receives) | messages | moment gathers "
          "(KiB each rank sends) | whole-node MiB one rank receives | max rank FLOPs / single | "
          + " | ".join(f"est. speedup at {g:g} GB/s" for g in links) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(links))
    for op in args.ops.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            latent = (size // 8, size // 8)
            base = exact_plan_for(config, op, latent, 1, 4, config.sample_height_width[0], None, None)
            c = config.block_out_channels[-1]
            n = latent[0] * latent[1]
            single = sum(rank_flops(base, 1)) + attention_flops(c, n, n)
            for world in (int(r) for r in args.ranks.split(",")):
                plan = spread(base, world)
                v = volume(plan, world)
                worst = max(f + attention_flops(c, n, n * (-(-latent[0] // world)) // latent[0])
                            for f in rank_flops(plan, world))
                received = v["halo_bytes_per_rank"] + v["whole_bytes_per_rank"]
                compute = worst / (args.tflops * 1e12)
                speedups = [single / (args.tflops * 1e12) / (compute + received / (g * 1e9)) for g in links]
                print(f"| {op} | {size} | {world} | {_mib(v['halo_bytes'])} | {_mib(v['halo_bytes_per_rank'])} | "
                      f"{v['halo_messages']} | {v['moment_gathers']} ({v['moment_bytes'] / world / 1024:.0f}) | "
                      f"{_mib(v['whole_bytes_per_rank'])} | {worst / single:.3f} | "
                      + " | ".join(f"{s:.2f}x" for s in speedups) + " |", flush=True)


if __name__ == "__main__":
    main()
