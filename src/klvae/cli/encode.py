"""``klvae encode IMAGES... -o OUT``: images to latents, one safetensors file per image.

Each file holds ``latents`` (1, c, h, w) and metadata: the model, whether latent scaling was applied
(``--scaled``: what a diffusion model sees) or not (the default: raw ``encode`` output), the factors, and the
image's size. Images of any size are padded (mirrored) to the model's factor (FLUX.2 with ``--scaled``: twice
that, for its 2x2 latent patches); ``klvae decode`` crops back.
OUT is a folder (``OUT/<name>.safetensors``), or for one image may be a ``.safetensors`` file.
"""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    from klvae.cli.options import add_model_options, add_output_options

    p = sub.add_parser("encode", help="encode images to latents (safetensors with metadata)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder, or a .safetensors file "
                   "for a single image")
    p.add_argument("--scaled", action="store_true",
                   help="apply the model's latent scaling (scaling_factor, shift_factor, latents_mean/std; FLUX.2: "
                        "2x2 patches normalised by its BatchNorm statistics)")
    p.add_argument("--sample", action="store_true", help="draw from the posterior instead of taking its mode")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--save-dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the stored latents")
    p.add_argument("--batch-size", type=int, default=1, help="images of equal padded size encoded together")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def output_paths(images: list[str], output: str) -> list[str]:
    from klvae.cli.common import CLIError, unique_stems

    if output.endswith(".safetensors") and not os.path.isdir(output):
        if len(images) != 1:
            raise CLIError(f"-o {output}: a single file holds one image's latents; give a folder for "
                           f"{len(images)} images")
        return [output]
    return [os.path.join(output, s + ".safetensors") for s in unique_stems(images)]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from klvae.cli.common import (CLIError, batches_by_shape, check_images_readable, check_outputs, expand_inputs,
                                  load_runner, note)
    from klvae.images import is_image_name, pad_to_multiple, read_image, to_channels, to_model_input
    from klvae.latentfile import STORAGE_DTYPES, latent_metadata, write_latents
    from klvae.progress import progress

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    images = expand_inputs(args.images, is_image_name, "images")
    outputs = output_paths(images, args.output)
    check_outputs(outputs, args.force)
    check_images_readable(images)
    runner = load_runner(args)
    cfg, factor = runner.config, runner.pixel_multiple(args.scaled)
    rng = np.random.default_rng(args.seed)

    def prepared():
        for path, out in zip(images, outputs):
            img = read_image(path)
            pixels = pad_to_multiple(to_channels(img.pixels, cfg.in_channels, path), factor)
            yield path, out, img.size, to_model_input(pixels)

    shapes = set()
    items = progress(prepared(), len(images), "encode", args.quiet)
    for batch in batches_by_shape(items, lambda item: item[3].shape, args.batch_size):
        mean, logvar = runner.encode(np.stack([item[3] for item in batch]))
        z = mean
        if args.sample:
            z = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)
        if args.scaled:
            z = runner.scaling.scale(z)
        if not runner.writes:  # another rank of a distributed run writes
            continue
        for (path, out, size, x), latents in zip(batch, z):
            meta = latent_metadata(runner, args.scaled, source=os.path.basename(path), source_size=list(size),
                                   padded_size=list(x.shape[1:]),
                                   posterior="sample" if args.sample else "mode",
                                   **({"seed": args.seed} if args.sample else {}))
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            write_latents(out, {"latents": latents[None].astype(STORAGE_DTYPES[args.save_dtype])}, meta)
            shapes.add("x".join(map(str, latents.shape)))
    note(f"encoded {len(images)} image(s) with {runner.describe()} -> {args.output} (latents "
         f"{', '.join(sorted(shapes))}; {'scaled' if args.scaled else 'raw'})", args.quiet)
    return 0
