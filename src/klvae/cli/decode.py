"""``klvae decode LATENTS... -o DIR``: latents to images.

LATENTS are ``.safetensors`` files (from ``klvae encode``, cache shards, or other tools) or ``.npy`` arrays,
shaped (c, h, w) or (B, c, h, w). Files written by klvae say whether their latents are scaled, and the source
image size to crop back to; for other files pass ``--scaled`` if they are scaled (diffusion pipelines' latent
outputs are), else they are taken as raw ``encode`` output. One file with one latent gives ``DIR/<name>.png``;
more give ``DIR/<name>-<key>[-<index>].png``.
"""

from __future__ import annotations

import argparse
import os
import re


def register(sub: argparse._SubParsersAction) -> None:
    from klvae.cli.options import add_model_options, add_output_options

    p = sub.add_parser("decode", help="decode latents (safetensors/.npy) to images", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("latents", nargs="+", metavar="LATENTS", help="latent files, or folders of them")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    scaling = p.add_mutually_exclusive_group()
    scaling.add_argument("--scaled", action="store_true", default=None,
                         help="the latents are scaled (overrides the file's metadata)")
    scaling.add_argument("--raw", dest="scaled", action="store_false", help="the latents are raw encode output")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="bits per sample of PNG output")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default="png", help="image file type")
    p.add_argument("--batch-size", type=int, default=1, help="latents of equal shape decoded together")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "latents"


def plan(paths: list[str]) -> list[tuple]:
    """``(source, output stem, batch index or None, (c, h, w) latents, metadata)`` for every latent."""
    import numpy as np

    from klvae.cli.common import CLIError, unique_stems
    from klvae.latentfile import read_latents

    out = []
    for path, stem in zip(paths, unique_stems(paths)):
        tensors, meta = read_latents(path)
        for key, value in tensors.items():
            if value.ndim == 3:
                value = value[None]
            if value.ndim != 4:
                raise CLIError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}; latents are (c, h, w) or "
                               "(batch, c, h, w)")
            if not np.issubdtype(value.dtype, np.floating):
                raise CLIError(f"{path}: tensor {key!r} has dtype {value.dtype}; latents are floating point")
            name = stem if len(tensors) == 1 else f"{stem}-{_safe(key)}"
            for i, z in enumerate(value):
                out.append((path, name, i if value.shape[0] > 1 else None, z, meta))
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from klvae.cli.common import CLIError, batches_by_shape, check_outputs, expand_inputs, load_runner, note
    from klvae.images import from_model_output, write_image
    from klvae.progress import progress

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.bits == 16 and args.format != "png":
        raise CLIError("--bits 16 needs --format png")
    paths = expand_inputs(args.latents, lambda n: n.endswith((".safetensors", ".npy")), "latent files")
    items = plan(paths)
    outputs = [os.path.join(args.output, f"{name}{'' if i is None else f'-{i}'}.{args.format}")
               for _, name, i, _, _ in items]
    check_outputs(outputs, args.force)
    runner = load_runner(args)
    cfg = runner.config
    # Unscale first (FLUX.2's convention also changes the shape), then check what the model takes.
    items = [(path, name, i, _unscaled(path, z, meta, args.scaled, runner), meta)
             for path, name, i, z, meta in items]
    for path, _, _, z, meta in items:
        if z.shape[0] != cfg.latent_channels:
            raise CLIError(f"{path}: latents have {z.shape[0]} channels; the model {runner.source.name} takes "
                           f"{cfg.latent_channels}")
    _note_other_model(items, runner, args.quiet)

    jobs = [(item, out) for item, out in zip(items, outputs)]
    count = 0
    for batch in batches_by_shape(progress(jobs, len(jobs), "decode", args.quiet), lambda j: j[0][3].shape,
                                  args.batch_size):
        images = runner.decode(np.stack([z for (_, _, _, z, _), _ in batch]))
        if not runner.writes:  # another rank of a distributed run writes
            continue
        os.makedirs(args.output, exist_ok=True)
        for ((path, _, _, z, meta), out), image in zip(batch, images):
            pixels = from_model_output(image)
            if meta and meta.get("source_size"):
                h, w = meta["source_size"]
                pixels = pixels[:h, :w]
            write_image(out, pixels, args.bits)
            count += 1
    note(f"decoded {count} latent(s) with {runner.describe()} -> {args.output}", args.quiet)
    return 0


def _unscaled(path: str, z, meta, scaled_flag: bool | None, runner):
    """Raw float32 latents: undo the convention the file's metadata records (else the model's) when scaled."""
    import numpy as np

    from klvae.cli.common import CLIError
    from klvae.errors import KLVAEError
    from klvae.latents import LatentScaling

    z = z.astype(np.float32)
    scaled = scaled_flag if scaled_flag is not None else bool(meta and meta.get("scaled"))
    if not scaled:
        return z
    try:
        scaling = LatentScaling.from_mapping(meta["scaling"]) if meta and "scaling" in meta else runner.scaling
        return scaling.unscale(z[None])[0]
    except (KLVAEError, TypeError, ValueError) as e:
        raise CLIError(f"{path}: cannot undo the latent scaling ({e})") from None


def _note_other_model(items, runner, quiet: bool) -> None:
    from klvae.cli.common import note

    others = {meta.get("model") for *_, meta in items if meta and meta.get("model") != runner.source.name}
    if others:
        note(f"note: latents were encoded with {', '.join(sorted(map(str, others)))}; decoding with "
             f"{runner.source.name}", quiet)
