"""``klvae convert IN OUT``: convert VAE weights between diffusers folders, original single files and Flax.

IN is a diffusers folder (or hub repo id), a Flax folder (``config.json`` + ``diffusion_flax_model.msgpack``,
the layout of diffusers' ``FlaxAutoencoderKL``), or a single file (local or
a hub file URL; original or diffusers layout; a bare VAE or a full checkpoint holding one). OUT's kind comes
from ``--to``, else from its name: ``.safetensors``/``.ckpt``/``.pt``/``.pth``/``.bin`` is an original-layout
single file, anything else a diffusers folder. Weights keep their dtype unless ``--dtype`` is given. Output
is written atomically: after an error nothing is left at OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
KINDS = ("diffusers", "single-file", "flax")
# diffusers' FlaxAutoencoderKL weights file: the Flax parameter tree, msgpack-serialised by flax.
FLAX_WEIGHTS = "diffusion_flax_model.msgpack"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert weights between diffusers folders, original single files and Flax",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="diffusers/Flax folder, hub repo id, single file or hub file URL")
    p.add_argument("output", metavar="OUT", help="output folder or single file")
    p.add_argument("--to", choices=KINDS, help="output kind (default: from OUT's name)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast floating weights (default: keep)")
    p.add_argument("--config", help="config of a single-file IN: preset name, diffusers folder, config.json or "
                                    "hub repo id (default: inferred from the weights)")
    p.add_argument("--prefix", default="", choices=("", "first_stage_model.", "vae."),
                   help="key prefix of a single-file OUT, as inside a full checkpoint (default: none, a bare VAE)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def input_kind(source: str) -> str:
    if os.path.isdir(source):
        has_torch = any(n.startswith("diffusion_pytorch_model") for n in os.listdir(source))
        return "flax" if os.path.isfile(os.path.join(source, FLAX_WEIGHTS)) and not has_torch else "diffusers"
    if os.path.isfile(source) or "://" in source or source.startswith(("huggingface.co/", "hf.co/")):
        return "single-file"
    return "diffusers"  # a hub repo id


def output_kind(target: str, to: str | None) -> str:
    if to:
        return to
    return "single-file" if target.endswith(SINGLE_FILE_SUFFIXES) else "diffusers"


def run(args: argparse.Namespace) -> int:
    from klvae.errors import WeightsError

    kind_in, kind_out = input_kind(args.input), output_kind(args.output, args.to)
    if args.config and kind_in != "single-file":
        raise WeightsError(f"{args.input}: --config applies to single-file inputs only (folders carry config.json)")
    if os.path.lexists(args.output) and not args.overwrite:
        raise WeightsError(f"{args.output}: already exists (pass --overwrite to replace it)")
    if kind_out == "single-file" and not args.output.endswith(SINGLE_FILE_SUFFIXES):
        raise WeightsError(f"{args.output}: a single file needs one of the suffixes {', '.join(SINGLE_FILE_SUFFIXES)}")
    from klvae.latents import describe_convention

    config, state_dict, dtype = _read(kind_in, args.input, args.config)
    if args.dtype:
        dtype = args.dtype
    _write(kind_out, args.output, config, state_dict, dtype, args.prefix, args.overwrite)
    print(f"{args.input} ({kind_in}) -> {args.output} ({kind_out}, {dtype or 'float32'}): "
          f"{len(state_dict)} tensors, {config.class_name}, latent_channels={config.latent_channels}, "
          f"latents scaled {describe_convention(config)}")
    return 0


def _read(kind: str, source: str, config_arg: str | None):
    """``(config, canonical torch state dict, dtype name or None)`` of IN."""
    if kind == "single-file":
        from klvae.weights.single_file import read_vae

        weights = read_vae(source, config_arg)
        config, tensors = weights.config, weights.state_dict
    elif kind == "flax":
        config, tensors = _read_flax(source)
    else:
        from klvae.config import read_config_file
        from klvae.hub import resolve_pretrained
        from klvae.torch.state_dict import canonical_state_dict, load_weights_file

        config_path, weights_path = resolve_pretrained(source)
        config = read_config_file(config_path)
        tensors = canonical_state_dict(load_weights_file(weights_path), config, weights_path)
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()}
    return config, tensors, dtypes.pop() if len(dtypes) == 1 else None


def _read_flax(source: str):
    from klvae.config import read_config_file
    from klvae.errors import WeightsError
    from klvae.weights.flax import flax_to_canonical

    config = read_config_file(os.path.join(source, "config.json"))
    path = os.path.join(source, FLAX_WEIGHTS)
    try:
        from flax.serialization import msgpack_restore

        with open(path, "rb") as f:
            params = msgpack_restore(f.read())  # plain data only: msgpack cannot carry code
    except ImportError:
        raise WeightsError(f"{path}: reading Flax weights needs flax (pip install 'klvae[flax]')") from None
    except Exception as e:
        raise WeightsError(f"{path}: cannot read as a Flax msgpack file ({type(e).__name__}: {e})") from None
    canonical = flax_to_canonical(params, config, source=path)
    return config, {k: _numpy_to_torch(v) for k, v in canonical.items()}


def _numpy_to_torch(array):
    import numpy as np
    import torch

    if array.dtype.name == "bfloat16":  # numpy has no bf16; go through float32 (exact)
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _write(kind: str, target: str, config, state_dict, dtype, prefix: str, overwrite: bool) -> None:
    if kind == "single-file":
        from klvae.torch.single_file import write_single_file

        if os.path.isdir(target):
            raise NotADirectoryError(f"{target}: is a folder; cannot replace it with a single file")
        write_single_file(target, state_dict, config, prefix=prefix, dtype=dtype)
        return
    with _atomic_folder(target, overwrite) as tmp:
        if kind == "flax":
            _write_flax(tmp, config, state_dict, dtype)
        else:
            from klvae.torch.auto import model_class
            from klvae.torch.state_dict import as_torch_dtype, build_from_state_dict

            model = build_from_state_dict(model_class(config.class_name), config, state_dict,
                                          dtype=as_torch_dtype(dtype), source=target)
            model.save_pretrained(tmp)


def _write_flax(folder: str, config, state_dict, dtype) -> None:
    from flax.serialization import msgpack_serialize

    from klvae.fileio import atomic_write_bytes
    from klvae.weights.flax import canonical_to_flax

    params = canonical_to_flax(state_dict, config, dtype=dtype, source=folder)
    atomic_write_bytes(os.path.join(folder, FLAX_WEIGHTS), msgpack_serialize(params))
    config.to_json_file(os.path.join(folder, "config.json"))


@contextlib.contextmanager
def _atomic_folder(target: str, overwrite: bool):
    """A temporary folder beside ``target`` that becomes ``target`` only when the body succeeds."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if os.path.lexists(target):
            if not overwrite:
                raise FileExistsError(f"{target}: appeared while converting")
            old = tmp + ".old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
