"""Key maps between diffusers' layout (canonical) and the original LDM/SGM layout of single-file checkpoints.

The original layout is the one of CompVis/Stability's ``AutoencoderKL`` (SD 1/2, SDXL) and of SD3's and FLUX's
VAEs (``ae.safetensors``): ``encoder.down.{i}.block.{j}``, ``mid.attn_1.q`` as 1x1 convolutions, decoder up
blocks numbered from the lowest resolution's last (``decoder.up.{n-1}`` is diffusers' ``up_blocks.0``).
FLUX.2's ``ae.safetensors`` nests the quant convs (``encoder.quant_conv``, ``decoder.post_quant_conv``) and adds
its latent BatchNorm's buffers (``bn.running_mean`` ...) at the top level, named as in diffusers.

The map is one table of template pairs, read in either direction. Pure: tensors are touched only through
``.shape`` and ``.reshape``, so numpy arrays, torch tensors and jax arrays all work and nothing is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from klvae.errors import WeightsError

#: Prefixes under which full checkpoints store their VAE (SD/SDXL/SD3 use the first, FLUX bundles the second).
VAE_PREFIXES = ("first_stage_model.", "vae.")
#: Keys of the original training module that are not autoencoder weights (LPIPS + discriminator, EMA state).
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")

# Leaf names inside a resnet and the mid-block attention: original -> diffusers.
_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# (original, diffusers) module templates; every key is "<module>.weight" or "<module>.bias".
# {m}: encoder|decoder; {i}, {j}: indices; {rev}: the original index of diffusers' up block {i}, n - 1 - i;
# {res}/{attn}: a resnet/attention leaf, renamed through the tables above.
_TEMPLATES = (
    ("{m}.conv_in", "{m}.conv_in"),
    ("{m}.conv_out", "{m}.conv_out"),
    ("{m}.norm_out", "{m}.conv_norm_out"),
    ("encoder.down.{i}.block.{j}.{res}", "encoder.down_blocks.{i}.resnets.{j}.{res}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("{m}.mid.block_1.{res}", "{m}.mid_block.resnets.0.{res}"),
    ("{m}.mid.block_2.{res}", "{m}.mid_block.resnets.1.{res}"),
    ("{m}.mid.attn_1.{attn}", "{m}.mid_block.attentions.0.{attn}"),
    ("decoder.up.{rev}.block.{j}.{res}", "decoder.up_blocks.{i}.resnets.{j}.{res}"),
    ("decoder.up.{rev}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv"),
)
# Where the quant convs sit: at the top level (LDM, SD3, FLUX.1), or inside encoder/decoder (FLUX.2).
_TOP_QUANT_CONVS = (("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"))
_NESTED_QUANT_CONVS = (("encoder.quant_conv", "quant_conv"), ("decoder.post_quant_conv", "post_quant_conv"))
# FLUX.2's latent statistics: buffers with the same names in both layouts.
_BATCH_NORM_KEYS = frozenset({"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"})

_ORIGINAL, _DIFFUSERS = 0, 1


def _leaf_tables(side: int) -> dict[str, dict[str, str]]:
    """For each leaf placeholder, ``{name on this side: name on the other side}``."""
    tables = {"res": _RESNET_LEAVES, "attn": _ATTENTION_LEAVES}
    if side == _DIFFUSERS:
        return {k: {v: o for o, v in t.items()} for k, t in tables.items()}
    return {k: dict(t) for k, t in tables.items()}


def _compile(template: str, side: int) -> re.Pattern[str]:
    leaves = _leaf_tables(side)
    groups = {"m": "encoder|decoder", "i": r"\d+", "j": r"\d+", "rev": r"\d+",
              "res": "|".join(map(re.escape, leaves["res"])), "attn": "|".join(map(re.escape, leaves["attn"]))}
    out, pos = [], 0
    for match in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:match.start()]))
        name = match.group(1)
        out.append(f"(?P<{name}>{groups[name]})")
        pos = match.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\.(?P<param>weight|bias)")


def _rules(templates: tuple[tuple[str, str], ...], side: int) -> list[tuple[re.Pattern[str], str]]:
    return [(_compile(pair[side], side), pair[1 - side]) for pair in templates]


# Reading original keys accepts both placements of the quant convs; writing chooses one.
_RULES = {(_ORIGINAL, False): _rules(_TEMPLATES + _TOP_QUANT_CONVS + _NESTED_QUANT_CONVS, _ORIGINAL),
          (_DIFFUSERS, False): _rules(_TEMPLATES + _TOP_QUANT_CONVS, _DIFFUSERS),
          (_DIFFUSERS, True): _rules(_TEMPLATES + _NESTED_QUANT_CONVS, _DIFFUSERS)}


def _translate(key: str, side: int, num_blocks: int | None, nested_quant_convs: bool = False) -> str | None:
    if key in _BATCH_NORM_KEYS:
        return key
    leaves = _leaf_tables(side)
    for pattern, target in _RULES[(side, nested_quant_convs and side == _DIFFUSERS)]:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        values = match.groupdict()
        for name in ("res", "attn"):
            if values.get(name) is not None:
                values[name] = leaves[name][values[name]]
        if values.get("rev") is not None or values.get("i") is not None and "{rev}" in target:
            if num_blocks is None:
                raise ValueError(f"{key}: the number of blocks is needed to renumber decoder up blocks")
            if values.get("rev") is not None:
                values["i"] = str(num_blocks - 1 - int(values["rev"]))
            else:
                values["rev"] = str(num_blocks - 1 - int(values["i"]))
            if int(values["i"]) < 0 or int(values["rev"]) < 0:
                return None
        return target.format(**values) + "." + values["param"]
    return None


def to_diffusers_key(key: str, num_blocks: int | None) -> str | None:
    """The diffusers name of an original-layout key, or None if the key is not a VAE weight of that layout."""
    return _translate(key, _ORIGINAL, num_blocks)


def to_original_key(key: str, num_blocks: int | None, nested_quant_convs: bool = False) -> str | None:
    """The original-layout name of a diffusers key, or None if the key is not a VAE weight of that layout.
    ``nested_quant_convs``: FLUX.2's file layout (``encoder.quant_conv``, ``decoder.post_quant_conv``)."""
    return _translate(key, _DIFFUSERS, num_blocks, nested_quant_convs)


def has_batch_norm(keys: Iterable[str]) -> bool:
    """True for FLUX.2's VAE: its state dict holds the latent BatchNorm's statistics."""
    return any(k in _BATCH_NORM_KEYS for k in keys)


def is_attention_projection(diffusers_key: str) -> bool:
    """True for the mid-block attention's q/k/v/out weights: Linear in diffusers, 1x1 Conv2d in the original."""
    return bool(re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight",
                             diffusers_key))


def count_blocks(keys: Iterable[str], layout: str) -> int | None:
    """Number of resolution levels, from the largest encoder/decoder block index (None when no block key)."""
    pattern = (r"(?:encoder\.down|decoder\.up)\.(\d+)\." if layout == "original"
               else r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else None


def detect_layout(keys: Iterable[str]) -> str | None:
    """``"original"``, ``"diffusers"``, or None when the keys carry neither layout's block names."""
    keys = list(keys)
    original = any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.|(encoder|decoder)\.mid\.", k) for k in keys)
    diffusers = any(re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.\d+\.|(encoder|decoder)\.mid_block\.", k)
                    for k in keys)
    if original and diffusers:
        return "mixed"
    return "original" if original else "diffusers" if diffusers else None


def original_key_map(keys: Iterable[str], source: str = "weights") -> dict[str, str]:
    """``{original_key: diffusers_key}`` for every key; unrecognised keys raise :class:`WeightsError`."""
    keys = list(keys)
    n = count_blocks(keys, "original")
    mapping, unknown = {}, []
    for key in keys:
        new = to_diffusers_key(key, n)
        if new is None:
            unknown.append(key)
        else:
            mapping[key] = new
    if unknown:
        raise WeightsError(f"{source}: unknown layout: {len(unknown)} keys are not original-layout VAE weights: "
                           + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    return mapping


def original_to_diffusers(state_dict: Mapping[str, Any], source: str = "weights") -> dict[str, Any]:
    """Rename an original-layout VAE state dict to diffusers' keys; attention 1x1 convs become Linear weights.

    Only trailing singleton dims are dropped (``(C, C, 1, 1)`` and ``(C, C, 1)`` -> ``(C, C)``); any other shape
    is passed through for the strict shape check to report.
    """
    out = {}
    for old, new in original_key_map(state_dict, source).items():
        value = state_dict[old]
        if is_attention_projection(new) and len(value.shape) > 2 and all(d == 1 for d in value.shape[2:]):
            value = value.reshape(tuple(value.shape[:2]))
        out[new] = value
    return out


def diffusers_to_original(state_dict: Mapping[str, Any], prefix: str = "",
                          source: str = "weights") -> dict[str, Any]:
    """Rename a diffusers-layout VAE state dict to the original layout (attention weights as ``(C, C, 1, 1)``),
    each key prefixed with ``prefix`` (``""`` for a bare VAE file, ``"first_stage_model."`` inside a full one).
    FLUX.2's VAE (it has ``bn.*``) gets BFL's layout, its quant convs inside the encoder and decoder."""
    n = count_blocks(state_dict, "diffusers")
    nested = has_batch_norm(state_dict)
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = to_original_key(key, n, nested)
        if new is None:
            unknown.append(key)
            continue
        if is_attention_projection(key) and len(value.shape) == 2:
            value = value.reshape(tuple(value.shape) + (1, 1))
        out[prefix + new] = value
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} keys are not diffusers AutoencoderKL weights: "
                           + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    return out
