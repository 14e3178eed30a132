"""Would Winograd F(2x2, 3x3) convolutions speed up the SD decoder's 3x3 convs on this CPU? A probe, not a kernel.

F(2x2, 3x3) turns a 3x3 conv into 16 GEMMs of (C_out x C_in) by (C_in x H*W/4): 2.25x fewer multiply-adds than
the direct conv, paid for with an input transform (4x4 tiles at stride 2, so 4x the input's size) and an output
transform, both memory-bound. This script times, for the decoder's layer shapes (channels at the resolution of a
256x256 decode), oneDNN's direct conv (``F.conv2d``), the 16 GEMMs alone, and the whole Winograd conv written in
torch ops, and checks the Winograd result against a float64 direct conv:

    python benchmarks/winograd_probe.py --threads 2

Times are process CPU seconds (best of --repeats), so a busy machine inflates them less than wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# F(2, 3) matrices (Lavin & Gray, 2015): out = A^T [(G g G^T) * (B^T d B)] A on 4x4 tiles.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4, 4, C_out, C_in): G g G^T, computed in float64."""
    g = torch.tensor(_G, dtype=torch.float64)
    return torch.einsum("ak,oikl,bl->aboi", g, weight.double(), g).to(weight.dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A padding-1 3x3 conv of ``x`` (N, C, H, W), H and W even, given ``u = kernel_transform(weight)``."""
    n, c, h, w = x.shape
    c_out = u.shape[2]
    xp = F.pad(x, (1, 1, 1, 1))
    h2, w2 = h // 2, w // 2
    # B^T d B, separably: rows first (4 strided row sets), then columns, written into one (4, 4, ...) buffer.
    r = [xp[:, :, k:k + h:2] for k in range(4)]
    rows = (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])
    v = x.new_empty(4, 4, n, c, h2, w2)
    for a, t in enumerate(rows):
        col = [t[..., k:k + w:2] for k in range(4)]
        torch.sub(col[0], col[2], out=v[a, 0])
        torch.add(col[1], col[2], out=v[a, 1])
        torch.sub(col[2], col[1], out=v[a, 2])
        torch.sub(col[1], col[3], out=v[a, 3])
    m = torch.matmul(u.view(16, 1, c_out, c), v.view(16, n, c, h2 * w2)).view(4, 4, n, c_out, h2, w2)
    # A^T m A, rows then columns, each of the 2x2 outputs written to its phase of the output.
    out = x.new_empty(n, c_out, h2, 2, w2, 2)
    b = bias.view(1, -1, 1, 1)
    for p, s in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):
        torch.add(s[0] + s[1] + s[2], b, out=out[:, :, :, p, :, 0])
        torch.add(s[1] - s[2] - s[3], b, out=out[:, :, :, p, :, 1])
    return out.view(n, c_out, h, w)


def best_cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| channels | H=W | direct conv s | Winograd GEMMs s | Winograd total s | direct / Winograd | "
          "rel. err direct | rel. err Winograd |")
    print("|---|---|---|---|---|---|---|---|")
    for c, s in ((512, 32), (512, 64), (256, 128), (128, 256)):
        x = torch.randn(1, c, s, s)
        weight = torch.randn(c, c, 3, 3) / (3 * c ** 0.5)
        bias = torch.randn(c)
        u = kernel_transform(weight)
        v = torch.randn(16, 1, c, s * s // 4)
        ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)

        def rel(y: torch.Tensor) -> float:
            return float((y.double() - ref).abs().max() / ref.abs().max())

        direct = best_cpu_seconds(lambda: F.conv2d(x, weight, bias, padding=1), args.repeats)
        gemms = best_cpu_seconds(lambda: torch.matmul(u.view(16, 1, c, c), v), args.repeats)
        total = best_cpu_seconds(lambda: winograd_conv3x3(x, u, bias), args.repeats)
        print(f"| {c} | {s} | {direct:.3f} | {gemms:.3f} | {total:.3f} | {direct / total:.2f}x | "
              f"{rel(F.conv2d(x, weight, bias, padding=1)):.1e} | {rel(winograd_conv3x3(x, u, bias)):.1e} |")


if __name__ == "__main__":
    main()
