"""The shared config: diffusers' fields and defaults, config.json both ways, validation, presets, light imports."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from klvae.config import PRESETS, AutoencoderKLConfig, preset, resolve_config
from klvae.errors import ConfigError


def _normalise(value):
    return tuple(value) if isinstance(value, list) else value


def test_fields_and_defaults_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    theirs = {name: _normalise(p.default) for name, p in params.items() if name != "self"}
    ours = dict(AutoencoderKLConfig())
    assert ours == theirs


def test_reads_diffusers_config_json(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=16,
                                    shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                    latents_mean=[0.1] * 16, latents_std=[2.0] * 16, sample_size=[48, 64])
    model.save_config(tmp_path)
    ours = AutoencoderKLConfig.from_json_file(tmp_path / "config.json")
    theirs = {k: _normalise(v) for k, v in model.config.items() if not k.startswith("_")}
    assert dict(ours) == theirs


def test_written_config_json_reads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = preset("flux").replace(sample_size=(512, 768))
    cfg.to_json_file(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_class_name"] == "AutoencoderKL" and "_diffusers_version" in data
    loaded = diffusers.AutoencoderKL.load_config(tmp_path)
    theirs = diffusers.AutoencoderKL.from_config(loaded).config
    assert {k: _normalise(v) for k, v in theirs.items() if not k.startswith("_")} == dict(cfg)


def test_mapping_and_attribute_access():
    cfg = preset("sdxl")
    assert cfg.scaling_factor == cfg["scaling_factor"] == cfg.get("scaling_factor") == 0.13025
    assert "latents_mean" in cfg and "nonsense" not in cfg and cfg.get("nonsense", 3) == 3
    assert dict(**cfg)["block_out_channels"] == (128, 256, 512, 512)
    assert hash(cfg) == hash(preset("sdxl").replace())
    with pytest.raises(KeyError):
        cfg["nonsense"]
    with pytest.raises(Exception):
        cfg.scaling_factor = 1.0  # frozen


def test_presets_carry_published_factors():
    assert preset("sd1").scaling_factor == 0.18215 and preset("sd15") is preset("sd1")
    assert preset("sdxl").scaling_factor == 0.13025 and preset("sdxl").force_upcast
    assert not preset("sdxl-fp16-fix").force_upcast
    for name, scale, shift in (("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)):
        cfg = preset(name)
        assert (cfg.scaling_factor, cfg.shift_factor, cfg.latent_channels) == (scale, shift, 16)
        assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    for cfg in PRESETS.values():
        if cfg.block_out_channels == (128, 256, 512, 512):
            assert cfg.layers_per_block == 2 and cfg.downsample_factor == 8
    with pytest.raises(ConfigError, match="unknown preset 'sd9'"):
        preset("sd9")


@pytest.mark.parametrize("fields, message", [
    (dict(block_out_channels=(8, 16)), "same length"),
    (dict(block_out_channels=(30,), norm_num_groups=4), "not divisible by norm_num_groups=4"),
    (dict(down_block_types=("CrossAttnDownBlock2D",), block_out_channels=(32,)), "unknown block type"),
    (dict(act_fn="tanh", block_out_channels=(32,)), "unknown activation 'tanh'"),
    (dict(latents_mean=(0.0,) * 4, block_out_channels=(32,)), "given together"),
    (dict(latents_mean=(0.0,) * 3, latents_std=(1.0,) * 3, block_out_channels=(32,)), "expected latent_channels=4"),
    (dict(layers_per_block=0, block_out_channels=(32,)), "layers_per_block must be a positive integer"),
    (dict(scaling_factor=0.0, block_out_channels=(32,)), "must not be zero"),
    (dict(use_quant_conv="yes", block_out_channels=(32,)), "use_quant_conv must be true or false"),
    (dict(block_out_channels="128", norm_num_groups=1), "must be a list"),
])
def test_validation_errors_name_the_problem(fields, message):
    with pytest.raises(ConfigError, match=message):
        AutoencoderKLConfig(**fields)


def test_config_json_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AutoencoderKLConfig.from_json_file(tmp_path / "bad.json")
    (tmp_path / "unet.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ConfigError, match="not an AutoencoderKL config"):
        AutoencoderKLConfig.from_json_file(tmp_path / "unet.json")
    with pytest.raises(ConfigError, match="no such config file"):
        AutoencoderKLConfig.from_json_file(tmp_path / "missing.json")
    (tmp_path / "extra.json").write_text(json.dumps({"block_out_channels": [32], "norm_type": "group",
                                                     "_name_or_path": "x"}))
    with pytest.warns(UserWarning, match="norm_type"):
        cfg = AutoencoderKLConfig.from_json_file(tmp_path / "extra.json")
    assert cfg.block_out_channels == (32,)


def test_resolve_config_accepts_every_form(tmp_path):
    cfg = preset("sd3")
    cfg.to_json_file(tmp_path / "config.json")
    assert resolve_config("sd3") == cfg
    assert resolve_config(tmp_path) == cfg
    assert resolve_config(tmp_path / "config.json") == cfg
    assert resolve_config(cfg.to_dict()) == cfg
    assert resolve_config(cfg, sample_size=64).sample_size == 64


def test_config_and_weights_layers_import_neither_torch_nor_jax():
    code = ("import sys, klvae, klvae.config, klvae.latents, klvae.tiling, klvae.hub, klvae.fileio, "
            "klvae.weights.layout, klvae.weights.files\n"
            "klvae.preset('sd1')\n"
            "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
