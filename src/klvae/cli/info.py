"""``klvae info [MODEL]``: what a model is: its layout, config, parameter count and weight dtype.

MODEL is a diffusers folder, a single file (original or diffusers keys; a bare VAE or a full checkpoint
holding one), a hub file URL or a hub repo id; without it, the bundled default model. The weights are checked
against the config (keys and shapes) without building a model.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's layout, config, parameter count and dtype", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="model folder, single file, URL or hub repo id")
    p.add_argument("--config", dest="model_config", help="config of a single-file MODEL (preset name, diffusers "
                   "folder or config.json; default: from the file or inferred from the weights)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def describe(model: str | None, model_config: str | None = None) -> dict[str, Any]:
    """Everything ``info`` reports, as plain data."""
    from klvae.cli.common import CLIError, model_source
    from klvae.latents import describe_convention
    from klvae.weights.infer import matching_presets
    from klvae.weights.layout import BATCH_NORM_KEYS, state_dict_shapes

    source = model_source(model)
    if source.kind == "file":
        config, layout, dtypes = _single_file(source.location, model_config)
    else:
        if model_config is not None:
            raise CLIError("--config applies to single-file models only (folders and hub repos carry config.json)")
        config, layout, dtypes = _folder(source.location, from_hub=source.kind == "hub")
    shapes = state_dict_shapes(config)
    count = {"encoder": 0, "decoder": 0}
    for key, shape in shapes.items():
        if key not in BATCH_NORM_KEYS:  # FLUX.2's latent statistics are buffers, not parameters
            count["encoder" if key.startswith(("encoder.", "quant_conv.")) else "decoder"] += math.prod(shape)
    dtypes = Counter({d: n for d, n in dtypes.items() if not d.startswith(("int", "I", "U"))})  # counters aside
    return {
        "model": source.name, "location": source.location, "layout": layout, "class": config.class_name,
        "dtype": ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common()) if len(dtypes) > 1
        else next(iter(dtypes), "unknown"),
        "parameters": {"total": count["encoder"] + count["decoder"], **count},
        "downsample_factor": config.downsample_factor, "latent_channels": config.latent_channels,
        "latent_convention": describe_convention(config),
        "matching_presets": matching_presets(config), "config": config.to_dict(),
    }


def _folder(location: str, from_hub: bool):
    from klvae.config import read_config_file
    from klvae.hub import resolve_pretrained
    from klvae.weights.files import INDEX_SUFFIX, read_safetensors_header, shard_files
    from klvae.weights.layout import check_shapes, rename_legacy_attention_keys, state_dict_shapes

    config_path, weights_path = resolve_pretrained(location)
    config = read_config_file(config_path)
    files = shard_files(weights_path) if weights_path.endswith(INDEX_SUFFIX) else [weights_path]
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        if path.endswith(".safetensors"):
            found.update(read_safetensors_header(path))
        else:  # a legacy pickle: torch reads it, weights only
            from klvae.torch.state_dict import load_weights_file

            found.update({k: (str(v.dtype).removeprefix("torch."), tuple(v.shape))
                          for k, v in load_weights_file(path).items()})
    renames = rename_legacy_attention_keys(list(found))
    found = {renames.get(k, k): v for k, v in found.items()}
    check_shapes(state_dict_shapes(config), {k: shape for k, (_, shape) in found.items()}, weights_path)
    kind = ("diffusers repo on the hub" if from_hub else "diffusers folder") + (" (sharded)" if len(files) > 1 else "")
    return config, kind, Counter(_dtype_name(d) for d, _ in found.values())


def _single_file(location: str, model_config: str | None):
    from klvae.weights.single_file import read_vae

    weights = read_vae(location, model_config, framework="numpy")
    where = f"inside a full checkpoint under '{weights.prefix}'" if weights.prefix else "a bare VAE"
    layout = f"single file, {weights.layout} keys, {where}"
    if weights.ignored:
        layout += f" ({len(weights.ignored)} training-only tensors skipped)"
    return weights.config, layout, Counter(_dtype_name(str(v.dtype)) for v in weights.state_dict.values())


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _dtype_name(name: str) -> str:
    return _DTYPE_NAMES.get(name, name)


def run(args: argparse.Namespace) -> int:
    info = describe(args.model, args.model_config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    presets = ", ".join(info["matching_presets"]) or "none"
    print(f"model:       {info['model']}" + (f" ({info['location']})" if info["location"] != info["model"] else ""))
    print(f"class:       {info['class']}")
    print(f"layout:      {info['layout']}")
    print(f"dtype:       {info['dtype']}")
    print(f"parameters:  {p['total']:,} (encoder {p['encoder']:,}, decoder {p['decoder']:,})")
    print(f"latents:     {info['latent_channels']} channels, {info['downsample_factor']}x downsampling; scaled: "
          f"{info['latent_convention']}")
    print(f"presets with this architecture: {presets}")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key}: {json.dumps(value)}")
    return 0
