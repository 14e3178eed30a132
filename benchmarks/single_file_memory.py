"""Peak memory and time of loading the VAE out of a large full checkpoint: klvae vs diffusers.

Writes a fake "full checkpoint" once: a real-size SD VAE (sd1 preset, fp32, original layout, under
``first_stage_model.``) plus filler tensors standing for the UNet and text encoder, as ``.safetensors`` and as a
``.ckpt`` (torch zip pickle). Each load then runs in a fresh child process, which reports its resident memory
after imports and its peak resident memory (``VmHWM``) after loading, so numbers are not polluted by the
other runs. Page-cache state is whatever the machine has (the files are read once before timing).

    python benchmarks/single_file_memory.py [--filler-gb 2.0] [--workdir /tmp/klvae_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VAE_PREFIX = "first_stage_model."


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork time)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rchar_mb() -> float:
    """Bytes this process has read through read/pread syscalls (memory-mapped reads are not counted)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def make_files(workdir: str, filler_gb: float) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    import klvae
    from klvae.torch.single_file import original_state_dict

    paths = {"safetensors": os.path.join(workdir, "full.safetensors"), "ckpt": os.path.join(workdir, "full.ckpt"),
             "config": os.path.join(workdir, "vae_config")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(0)
    model = klvae.AutoencoderKL(klvae.preset("sd1"))
    model.save_pretrained(paths["config"])  # the local config folder diffusers needs offline
    tensors = original_state_dict(model.state_dict(), prefix=VAE_PREFIX)
    n_filler = max(1, int(filler_gb * 2**30 / (64 * 2**20)))
    for i in range(n_filler):  # 64 MiB each, with UNet/text-encoder key names
        tensors[f"model.diffusion_model.input_blocks.{i}.0.weight"] = torch.full((16 * 2**20,), float(i))
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(768)
    save_file(tensors, paths["safetensors"])
    torch.save({"state_dict": tensors}, paths["ckpt"])
    return paths


def child(which: str, fmt: str, paths: dict[str, str]) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if which == "klvae":
        import klvae

        load = lambda p: klvae.AutoencoderKL.from_single_file(p, config=paths["config"])  # noqa: E731
    else:
        import diffusers

        load = lambda p: diffusers.AutoencoderKL.from_single_file(  # noqa: E731
            p, config=paths["config"], local_files_only=True)
    torch.set_num_threads(1)
    base, rchar = _rss_mb(), _rchar_mb()
    start = time.perf_counter()
    model = load(paths[fmt])
    seconds = time.perf_counter() - start
    peak_load, read_mb = _peak_mb(), _rchar_mb() - rchar
    # Weights may still be lazily backed by the file; touching them all shows the memory the model really needs.
    with torch.no_grad():
        n_params = sum(int(p.numel()) for p in model.parameters() if p.sum() is not None)
    return {"which": which, "fmt": fmt, "base_mb": base, "peak_load_mb": peak_load, "peak_mb": _peak_mb(),
            "seconds": seconds, "params": n_params, "rss_after_mb": _rss_mb(), "read_mb": read_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filler-gb", type=float, default=2.0, help="size of the non-VAE tensors")
    parser.add_argument("--workdir", default="/tmp/klvae_single_file_bench")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "FMT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = {"safetensors": os.path.join(args.workdir, "full.safetensors"),
             "ckpt": os.path.join(args.workdir, "full.ckpt"), "config": os.path.join(args.workdir, "vae_config")}
    if args.child and args.child != ["make", "files"]:
        print(json.dumps(child(*args.child, paths)))
        return
    if args.child == ["make", "files"]:
        make_files(args.workdir, args.filler_gb)
        return
    # the files are made in a child too, so this process stays small
    subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--filler-gb", str(args.filler_gb),
                    "--child", "make", "files"], check=True)
    sizes = {fmt: os.path.getsize(paths[fmt]) / 2**20 for fmt in ("safetensors", "ckpt")}
    vae_mb = 83_653_863 * 4 / 2**20  # sd1 VAE parameters, fp32
    print(f"full checkpoint: safetensors {sizes['safetensors']:.0f} MiB, ckpt {sizes['ckpt']:.0f} MiB; "
          f"VAE part {vae_mb:.0f} MiB (fp32)")
    for fmt in ("safetensors", "ckpt"):  # warm the page cache the same way for both loaders
        with open(paths[fmt], "rb") as f:
            while f.read(64 * 2**20):
                pass
    results = {}
    for fmt in ("safetensors", "ckpt"):
        for which in ("klvae", "diffusers"):
            out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--child", which, fmt],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[which, fmt] = r
            print(f"{fmt:12s} {which:9s} load {r['seconds']:6.2f} s   RSS after imports {r['base_mb']:5.0f} MiB   "
                  f"peak during load {r['peak_load_mb']:5.0f} MiB   peak with weights touched {r['peak_mb']:5.0f} MiB"
                  f"   (+{r['peak_mb'] - r['base_mb']:.0f} MiB over imports)   read() {r['read_mb']:.0f} MiB")
    for fmt in ("safetensors", "ckpt"):
        k, d = results["klvae", fmt], results["diffusers", fmt]
        print(f"{fmt}: klvae/diffusers  load-time ratio {k['seconds'] / d['seconds']:.2f}   "
              f"(peak - base) ratio {(k['peak_mb'] - k['base_mb']) / (d['peak_mb'] - d['base_mb']):.2f}")


if __name__ == "__main__":
    main()
