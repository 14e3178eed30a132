"""Config inference from single files: architecture from shapes, factors from the matching family."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402
from test_single_file import (SD_LIKE, assert_same_outputs, fake_full_checkpoint, random_diffusers,  # noqa: E402
                              to_ldm)

import klvae  # noqa: E402
from klvae.config import PRESETS, AutoencoderKLConfig  # noqa: E402
from klvae.errors import StateDictMismatchError, WeightsError  # noqa: E402
from klvae.weights.infer import (AmbiguousConfigError, AmbiguousConfigWarning, architecture_of,  # noqa: E402
                                 infer_config)
from klvae.weights.layout import state_dict_shapes  # noqa: E402
from klvae.weights.single_file import read_single_file  # noqa: E402

BLOCKS3 = dict(SD_LIKE, block_out_channels=(32, 32, 64), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
# name: (diffusers fields, extra checkpoint family or None, expected scaling_factor, expected shift_factor)
VARIANTS = {
    "sd1_like_in_sd1_checkpoint": (SD_LIKE, "sd1", 0.18215, None),
    "sdxl_like_in_sdxl_checkpoint": (SD_LIKE, "sdxl", 0.13025, None),
    "three_blocks_two_layers": (BLOCKS3, "sd1", 0.18215, None),
    "no_mid_attention": (dict(SD_LIKE, mid_block_add_attention=False), "sd1", 0.18215, None),
    "gray_one_block": (dict(SD_LIKE, in_channels=1, out_channels=1, block_out_channels=(32,),
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)),
                       "sdxl", 0.13025, None),
    "sd3_like_in_sd3_checkpoint": (dict(SD_LIKE, latent_channels=16, use_quant_conv=False,
                                        use_post_quant_conv=False), "sd3", 1.5305, 0.0609),
    "flux_like_no_attention": (dict(SD_LIKE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                    mid_block_add_attention=False), "flux", 0.3611, 0.1159),
}
ARCH_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
               "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def write_ldm(tmp_path, fields, family=None, prefix="first_stage_model.", name="ckpt.safetensors", seed=0,
              metadata=None):
    ref = random_diffusers(fields, seed=seed)
    tensors = to_ldm(ref.state_dict(), fields, prefix if family else "")
    if family:
        tensors.update(fake_full_checkpoint(family))
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=metadata)
    return ref, path


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inferred_architecture_and_factors(tmp_path, name):
    fields, family, scaling, shift = VARIANTS[name]
    ref, path = write_ldm(tmp_path, fields, family)
    weights = read_single_file(path, framework="numpy")
    config = weights.config
    for field in ARCH_FIELDS:
        expected = getattr(ref.config, field)
        assert getattr(config, field) == (tuple(expected) if isinstance(expected, list) else expected), field
    assert config.scaling_factor == pytest.approx(scaling) and config.shift_factor == shift
    assert weights.layout == "original" and weights.prefix == "first_stage_model."
    assert set(weights.state_dict) == set(ref.state_dict())
    ours = klvae.AutoencoderKL.from_single_file(path)
    assert_same_outputs(ours, ref, in_channels=config.in_channels)


def test_bare_16_channel_file_is_ambiguous(tmp_path):
    fields = dict(SD_LIKE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    _, path = write_ldm(tmp_path, fields, None, name="ae.safetensors")
    with pytest.raises(AmbiguousConfigError) as info:
        klvae.AutoencoderKL.from_single_file(path)
    message = str(info.value)
    assert path in message and "config='flux'" in message and "config='sd3'" in message
    assert info.value.candidates == ("flux", "sd3")


def test_modelspec_metadata_names_the_family(tmp_path):
    fields = dict(SD_LIKE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    _, path = write_ldm(tmp_path, fields, None, metadata={"modelspec.architecture": "stable-diffusion-v3-medium"})
    assert read_single_file(path, framework="numpy").config.scaling_factor == pytest.approx(1.5305)


def test_family_hint_ignored_when_latent_space_differs(tmp_path):
    """A 4-channel VAE inside a FLUX-looking checkpoint is not given FLUX's factors."""
    ref, path = write_ldm(tmp_path, SD_LIKE, "flux", prefix="vae.")
    with pytest.warns(AmbiguousConfigWarning):
        config = read_single_file(path, framework="numpy").config
    assert config.scaling_factor == pytest.approx(0.18215) and config.shift_factor is None


def test_unpublished_latent_space_gets_default_factors_with_warning(tmp_path):
    fields = dict(SD_LIKE, latent_channels=8, use_quant_conv=False)
    ref, path = write_ldm(tmp_path, fields, None)
    with pytest.warns(AmbiguousConfigWarning, match="8 latent channels"):
        config = read_single_file(path, framework="numpy").config
    assert (config.latent_channels, config.use_quant_conv, config.use_post_quant_conv) == (8, False, True)
    assert config.scaling_factor == AutoencoderKLConfig().scaling_factor


def test_group_count_cannot_be_assumed(tmp_path):
    fields = dict(SD_LIKE, block_out_channels=(16, 48), norm_num_groups=8)
    _, path = write_ldm(tmp_path, fields, "sd1")
    with pytest.raises(WeightsError, match="norm_num_groups"):
        read_single_file(path, framework="numpy")
    # with the config given it loads
    ref = random_diffusers(fields, seed=0)
    model = klvae.AutoencoderKL.from_single_file(path, config=dict(fields))
    assert_same_outputs(model, ref)


def test_playground_edm_statistics(tmp_path):
    ref = random_diffusers(SD_LIKE)
    tensors = {**to_ldm(ref.state_dict(), SD_LIKE, "first_stage_model."), **fake_full_checkpoint("sdxl"),
               "edm_mean": torch.tensor([0.1, -0.2, 0.3, 0.4]).reshape(1, 4, 1, 1),
               "edm_std": torch.tensor([0.9, 1.1, 0.8, 1.2]).reshape(1, 4, 1, 1)}
    path = str(tmp_path / "pg.safetensors")
    save_file(tensors, path)
    config = read_single_file(path, framework="numpy").config
    assert config.scaling_factor == 0.5
    assert config.latents_mean == pytest.approx((0.1, -0.2, 0.3, 0.4))
    assert config.latents_std == pytest.approx((0.9, 1.1, 0.8, 1.2))


def test_exported_file_carries_its_config(tmp_path):
    """save_single_file stores the config; reading restores it exactly (even what shapes cannot show)."""
    from conftest import TINY_CONFIGS

    fields = TINY_CONFIGS["no_mid_attention_mish"]
    ref = random_diffusers(fields)
    model = klvae.AutoencoderKL(**fields)
    model.load_state_dict(ref.state_dict())
    path = str(tmp_path / "tiny.safetensors")
    model.save_single_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = klvae.AutoencoderKL.from_single_file(path)
    assert loaded.config == model.config
    assert_same_outputs(loaded, ref)
    from klvae.weights.files import safetensors_metadata

    assert json.loads(safetensors_metadata(path)["klvae_config"])["act_fn"] == "mish"


def test_explicit_config_must_fit(tmp_path):
    _, path = write_ldm(tmp_path, SD_LIKE, "sd1")
    with pytest.raises(StateDictMismatchError) as info:
        klvae.AutoencoderKL.from_single_file(path, config="sd1")
    assert path in str(info.value) and info.value.mismatched


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_presets_infer_from_shapes(name):
    """Real-size shape tables (no tensors): the architecture is recovered and, given the family, the preset."""
    shapes = state_dict_shapes(PRESETS[name])
    assert infer_config(shapes, family=name) == PRESETS[name]
    if PRESETS[name].latent_channels == 16:
        with pytest.raises(AmbiguousConfigError):
            infer_config(shapes)
    elif PRESETS[name].latent_patch_size is not None:  # FLUX.2: its latent statistics make it unambiguous
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert infer_config(shapes) == PRESETS[name]
    else:
        with pytest.warns(AmbiguousConfigWarning):
            config = infer_config(shapes)
        assert architecture_of(config) == architecture_of(PRESETS[name]) and config.scaling_factor == 0.18215
