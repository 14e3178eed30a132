"""Architecture inference from weight shapes, and the choice of latent factors for a single-file checkpoint.

The shapes of a diffusers-layout state dict fix every architecture field except ``act_fn`` and
``norm_num_groups``, which weights cannot show; every published VAE uses SiLU and 32 groups, so those are
assumed. Latent factors (``scaling_factor``, ``shift_factor``, ...) are not in the weights at all: they come
from the preset of the model family, found from the rest of a full checkpoint when there is one. A bare
16-channel VAE without quant convs may be SD3's or FLUX's; the user must say which (:class:`AmbiguousConfigError`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping

from klvae.config import PRESETS, AutoencoderKLConfig, AutoencoderKLFlux2Config
from klvae.errors import ConfigError, WeightsError
from klvae.weights.layout import Shape, check_shapes, state_dict_shapes

# Fields the weights determine; two configs with equal values here have the same state-dict shapes.
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                       "layers_per_block", "latent_channels", "norm_num_groups", "use_quant_conv",
                       "use_post_quant_conv", "mid_block_add_attention")
# The group count of every published VAE; GroupNorm weights do not reveal it.
DEFAULT_NORM_GROUPS = 32

# Keys outside the VAE that name the model family of a full checkpoint, most specific first.
FAMILY_MARKERS = (
    ("flux", re.compile(r"(model\.diffusion_model\.)?double_blocks\.")),
    ("sd3", re.compile(r"model\.diffusion_model\.joint_blocks\.")),
    ("sdxl", re.compile(r"conditioner\.embedders\.")),
    ("sd2", re.compile(r"cond_stage_model\.model\.")),
    ("sd1", re.compile(r"cond_stage_model\.transformer\.")),
)
# Substrings of a safetensors ``modelspec.architecture`` value (Stability's model spec) and their family.
MODELSPEC_FAMILIES = (("flux", "flux"), ("stable-diffusion-v3", "sd3"), ("stable-diffusion-xl", "sdxl"),
                      ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
# Playground v2.5 stores its latent statistics beside the VAE; with them the scaling factor is 0.5.
EDM_KEYS = ("edm_mean", "edm_std")
EDM_SCALING_FACTOR = 0.5


class AmbiguousConfigError(ConfigError):
    """The weights fit more than one published model whose latent factors differ; pass ``config=`` to choose."""

    def __init__(self, source: str, candidates: tuple[str, ...], reason: str):
        self.source = source
        self.candidates = candidates
        choices = " or ".join(f"config={c!r}" for c in candidates)
        super().__init__(f"{source}: {reason}; the file alone cannot tell which, and their latent factors differ. "
                         f"Pass {choices} (or a diffusers config folder, config.json or dict for another model).")


class AmbiguousConfigWarning(UserWarning):
    """A likely but unproven choice of latent factors was made."""


def detect_family(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """The preset family a full checkpoint belongs to, from its non-VAE keys or its model-spec metadata."""
    keys = list(keys)
    for family, marker in FAMILY_MARKERS:
        if any(marker.match(k) for k in keys):
            return family
    arch = (metadata or {}).get("modelspec.architecture", "").lower()
    for needle, family in MODELSPEC_FAMILIES:
        if needle in arch:
            return family
    return None


def infer_architecture(shapes: Mapping[str, Shape], source: str = "weights") -> dict:
    """Architecture fields from a diffusers-layout ``{key: shape}``; raises :class:`WeightsError` when essential
    keys are missing or disagree."""

    def shape(key: str) -> Shape:
        if key not in shapes:
            raise WeightsError(f"{source}: cannot infer the architecture: key {key} is missing")
        return tuple(shapes[key])

    n = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))),
                default=-1)
    if n == 0:
        raise WeightsError(f"{source}: cannot infer the architecture: no encoder.down_blocks keys")
    chans = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n))
    layers = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    latent = shape("decoder.conv_in.weight")[1]
    if shape("encoder.conv_out.weight")[0] != 2 * latent:
        raise WeightsError(f"{source}: encoder.conv_out has {shape('encoder.conv_out.weight')[0]} output channels "
                           f"but decoder.conv_in takes {latent}: not an AutoencoderKL (which needs 2 x latent)")
    decoder = tuple(reversed([shape(f"decoder.up_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(n)]))
    groups = DEFAULT_NORM_GROUPS
    if any(c % groups for c in chans + decoder):
        raise WeightsError(f"{source}: block channels {chans} (decoder {decoder}) are not multiples of {groups}, "
                           "so norm_num_groups cannot be assumed; pass config= with the model's config")
    arch = dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=chans,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=groups,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in shapes,
    )
    if "bn.running_mean" in shapes:  # FLUX.2: latent statistics over square patches of the latents
        patch_area = shape("bn.running_mean")[0] // latent
        side = round(patch_area ** 0.5)
        if side * side * latent != shape("bn.running_mean")[0]:
            raise WeightsError(f"{source}: bn.running_mean has {shape('bn.running_mean')[0]} channels, not "
                               f"{latent} latent channels times a square patch")
        arch.update(patch_size=(side, side), decoder_block_out_channels=decoder if decoder != chans else None)
    elif decoder != chans:
        raise WeightsError(f"{source}: the decoder's widths {decoder} differ from the encoder's {chans}, which "
                           "only FLUX.2's VAE allows, and this file has no FLUX.2 latent statistics (bn.*)")
    return arch


def _latent_signature(fields: Mapping) -> tuple:
    return (fields["latent_channels"], fields["use_quant_conv"], fields["use_post_quant_conv"])


def choose_family(arch: Mapping, family: str | None, source: str) -> str | None:
    """The preset whose latent factors apply to ``arch``: ``family`` when its latent space matches, else the one
    family with this latent space. Warns when SD 1/2 and SDXL cannot be told apart; raises
    :class:`AmbiguousConfigError` for 16 channels without quant convs (SD3 or FLUX)."""
    if family is not None and _latent_signature(PRESETS[family]) == _latent_signature(arch):
        return family
    sig = _latent_signature(arch)
    if sig == _latent_signature(PRESETS["sd3"]):
        raise AmbiguousConfigError(source, ("flux", "sd3"),
                                   "16 latent channels without quant convs: this is an SD3 or a FLUX VAE")
    if sig == _latent_signature(PRESETS["sd1"]):
        warnings.warn(f"{source}: a 4-channel VAE as in SD 1.x/2.x and SDXL, which share an architecture but not "
                      "a scaling_factor (0.18215 vs 0.13025); assuming SD 1.x. Pass config='sdxl' (or 'sd1') to "
                      "choose.", AmbiguousConfigWarning, stacklevel=4)
        return "sd1"
    return None


def infer_config(shapes: Mapping[str, Shape], *, family: str | None = None,
                 edm_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 source: str = "weights") -> AutoencoderKLConfig:
    """A config for diffusers-layout ``shapes``: the architecture from the shapes; every other field (sample
    size, latent factors, ``force_upcast``) from the chosen family's preset, or diffusers' defaults when no
    family's latent space matches. The shapes are then checked strictly against the result."""
    arch = infer_architecture(shapes, source)
    if "patch_size" in arch:  # FLUX.2: no latent factors to choose; the statistics are in the weights
        try:
            config = AutoencoderKLFlux2Config(**arch)
        except ConfigError as e:
            raise WeightsError(f"{source}: the inferred FLUX.2 architecture is not valid ({e})") from None
        check_shapes(state_dict_shapes(config), shapes, source)
        return config
    chosen = choose_family(arch, family, source)
    if chosen is None:
        warnings.warn(f"{source}: no published VAE has {arch['latent_channels']} latent channels with these quant "
                      "convs; using default latent factors (pass config= to set them)", AmbiguousConfigWarning,
                      stacklevel=3)
        base = AutoencoderKLConfig()
    else:
        base = PRESETS[chosen]
    try:
        config = base.replace(**arch)
        if edm_stats is not None:
            mean, std = edm_stats
            config = config.replace(scaling_factor=EDM_SCALING_FACTOR, latents_mean=mean, latents_std=std)
    except ConfigError as e:
        raise WeightsError(f"{source}: the inferred architecture is not valid ({e})") from None
    check_shapes(state_dict_shapes(config), shapes, source)
    return config


def architecture_of(config: AutoencoderKLConfig) -> dict:
    return {"class": config.class_name, "decoder": config.decoder_channels,
            **{name: getattr(config, name) for name in ARCHITECTURE_FIELDS}}


def matching_presets(config: AutoencoderKLConfig) -> list[str]:
    """Presets whose architecture equals ``config``'s (their weights are interchangeable)."""
    arch = architecture_of(config)
    return [name for name, p in PRESETS.items() if architecture_of(p) == arch]
