"""Options shared by the image subcommands (imported when the parser is built: keep it light)."""

from __future__ import annotations

import argparse

BACKENDS = ("torch", "flax")
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="diffusers folder, single file (.safetensors/.ckpt/...; original or diffusers keys), hub "
                        "file URL or hub repo id (default: the bundled default model)")
    g.add_argument("--config", default=None, dest="model_config",
                   help="config of a single-file --model: preset name, diffusers folder or config.json "
                        "(default: inferred from the weights)")
    g.add_argument("--backend", choices=BACKENDS, default="torch", help="the model implementation to run")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute and weight dtype")
    g.add_argument("--device", default="auto",
                   help="torch device (cpu, cuda, cuda:1, mps) or JAX platform (cpu, gpu, tpu); auto: the "
                        "first accelerator if there is one")
    g.add_argument("--tiling", nargs="?", const="default", default=None, metavar="MODE",
                   help="process large images in tiles; MODE is exact (torch default: same result as untiled), "
                        "blend (diffusers' algorithm; the Flax default), auto, or distributed (torch, under "
                        "torchrun: the exact tiles shared over the job's processes; rank 0 writes the outputs)")


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", "-f", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summaries")
