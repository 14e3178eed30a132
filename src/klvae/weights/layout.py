"""The canonical weight layout: diffusers' AutoencoderKL state_dict keys and shapes, derived from a config.

Pure Python: no torch, no jax. Used to check loaded weights strictly, to convert other layouts, and to infer
architectures from key shapes.
"""

from __future__ import annotations

from klvae.config import AutoencoderKLConfig

Shape = tuple[int, ...]


def _conv(prefix: str, c_out: int, c_in: int, k: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (c_out, c_in, k, k), f"{prefix}.bias": (c_out,)}


def _norm(prefix: str, c: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _linear(prefix: str, c_out: int, c_in: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (c_out, c_in), f"{prefix}.bias": (c_out,)}


def _resnet(prefix: str, c_in: int, c_out: int) -> dict[str, Shape]:
    shapes = {**_norm(f"{prefix}.norm1", c_in), **_conv(f"{prefix}.conv1", c_out, c_in, 3),
              **_norm(f"{prefix}.norm2", c_out), **_conv(f"{prefix}.conv2", c_out, c_out, 3)}
    if c_in != c_out:
        shapes.update(_conv(f"{prefix}.conv_shortcut", c_out, c_in, 1))
    return shapes


def _mid_block(prefix: str, c: int, attention: bool) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    if attention:
        a = f"{prefix}.attentions.0"
        shapes.update(_norm(f"{a}.group_norm", c))
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes.update(_linear(f"{a}.{name}", c, c))
    shapes.update(_resnet(f"{prefix}.resnets.0", c, c))
    shapes.update(_resnet(f"{prefix}.resnets.1", c, c))
    return shapes


def state_dict_shapes(config: AutoencoderKLConfig) -> dict[str, Shape]:
    """Every key of the model's state_dict with its shape, in the order torch registers them."""
    chans = config.block_out_channels
    n = len(chans)
    shapes: dict[str, Shape] = {}

    shapes.update(_conv("encoder.conv_in", chans[0], config.in_channels, 3))
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(config.layers_per_block):
            shapes.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_prev if j == 0 else c, c))
        if i < n - 1:
            shapes.update(_conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3))
        c_prev = c
    shapes.update(_mid_block("encoder.mid_block", chans[-1], config.mid_block_add_attention))
    shapes.update(_norm("encoder.conv_norm_out", chans[-1]))
    shapes.update(_conv("encoder.conv_out", 2 * config.latent_channels, chans[-1], 3))

    rev = tuple(reversed(config.decoder_channels))
    shapes.update(_conv("decoder.conv_in", rev[0], config.latent_channels, 3))
    c_prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(config.layers_per_block + 1):
            shapes.update(_resnet(f"decoder.up_blocks.{i}.resnets.{j}", c_prev if j == 0 else c, c))
        if i < n - 1:
            shapes.update(_conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3))
        c_prev = c
    shapes.update(_mid_block("decoder.mid_block", rev[0], config.mid_block_add_attention))
    shapes.update(_norm("decoder.conv_norm_out", rev[-1]))
    shapes.update(_conv("decoder.conv_out", config.out_channels, rev[-1], 3))

    if config.use_quant_conv:
        shapes.update(_conv("quant_conv", 2 * config.latent_channels, 2 * config.latent_channels, 1))
    if config.use_post_quant_conv:
        shapes.update(_conv("post_quant_conv", config.latent_channels, config.latent_channels, 1))
    if config.latent_patch_size is not None:  # FLUX.2's latent BatchNorm: statistics only (no affine)
        shapes.update({f"bn.{name}": (config.batch_norm_channels,) for name in ("running_mean", "running_var")})
        shapes["bn.num_batches_tracked"] = ()
    return shapes


#: FLUX.2's BatchNorm buffers: latent statistics, not trained weights; the same names in every layout.
BATCH_NORM_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


# Attention keys of diffusers folders saved before the attention refactor, and their current names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(keys: list[str]) -> dict[str, str]:
    """Map old diffusers mid-block attention keys (``attentions.0.query.weight``) to current ones.

    Returns ``{old_key: new_key}`` for the keys that need renaming; other keys are left out.
    """
    renames: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "0" and parts[-4:-3] == ["attentions"] and parts[-2] in LEGACY_ATTENTION_NAMES:
            renames[key] = ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return renames


def check_shapes(expected: dict[str, Shape], found: dict[str, Shape], source: str) -> None:
    """Raise :class:`StateDictMismatchError` unless ``found`` has exactly the expected keys and shapes."""
    from klvae.errors import StateDictMismatchError

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = {k: (expected[k], tuple(found[k])) for k in expected
                  if k in found and tuple(found[k]) != tuple(expected[k])}
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(source, missing, unexpected, mismatched)
