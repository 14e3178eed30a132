"""FLUX.2's VAE (AutoencoderKLFlux2) against diffusers' AutoencoderKLFlux2: config, weights, outputs, folders,
latent normalisation, BFL's single file, tiling and the other switches, the FLUX.2 pipeline, training."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import perturb_, rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_single_file import SD_LIKE, random_diffusers, to_ldm  # noqa: E402

import klvae  # noqa: E402
from klvae.config import AutoencoderKLFlux2Config, preset  # noqa: E402
from klvae.errors import ConfigError, InputShapeError, WeightsError  # noqa: E402
from klvae.latents import batch_norm_scaling, patchify, unpatchify  # noqa: E402

_TWO = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, latent_channels=4)
SYMMETRIC = dict(_TWO, block_out_channels=(8, 16), norm_num_groups=4)
ASYMMETRIC = dict(_TWO, block_out_channels=(8, 16), decoder_block_out_channels=(12, 8), norm_num_groups=4)
# Widths that are multiples of 32 groups, so a single file's architecture can be inferred (as for real files).
INFERABLE = dict(_TWO, block_out_channels=(32, 64), decoder_block_out_channels=(64, 32), norm_num_groups=32)


def flux2_pair(fields: dict, seed: int = 0):
    """(diffusers, klvae) AutoencoderKLFlux2 with the same perturbed weights and non-trivial statistics."""
    torch.manual_seed(seed)
    theirs = diffusers.AutoencoderKLFlux2(**fields)
    perturb_(theirs, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    theirs.bn.running_mean.copy_(torch.randn(theirs.bn.running_mean.shape, generator=g))
    theirs.bn.running_var.copy_(torch.rand(theirs.bn.running_var.shape, generator=g) * 2 + 0.25)
    theirs.bn.num_batches_tracked.fill_(4321)
    ours = klvae.AutoencoderKLFlux2(**fields)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


def _outputs(model, x):
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        return dist.mean, dist.logvar, model.decode(dist.mean).sample, model(x).sample


# ---------------------------------------------------------------------- config
def test_config_fields_and_defaults_equal_diffusers():
    params = inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters
    theirs = {n: tuple(p.default) if isinstance(p.default, list) else p.default
              for n, p in params.items() if n != "self"}
    assert dict(AutoencoderKLFlux2Config()) == theirs
    assert preset("flux2") == AutoencoderKLFlux2Config() and preset("FLUX.2") is preset("flux2")
    cfg = preset("flux2")
    assert cfg.latent_patch_size == (2, 2) and cfg.batch_norm_channels == 128 and cfg.scaling_factor is None
    assert klvae.AutoencoderKLFlux2(config=cfg.replace(block_out_channels=(32, 64, 128, 128))).config.sample_size == 1024


def test_published_architecture_has_diffusers_parameter_count():
    with torch.device("meta"):
        ours, theirs = klvae.AutoencoderKLFlux2(), diffusers.AutoencoderKLFlux2()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs) and round(count(ours) / 1e6, 1) == 84.0
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="decoder_block_out_channels .* must have as many blocks"):
        AutoencoderKLFlux2Config(decoder_block_out_channels=(64, 128))
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups"):
        AutoencoderKLFlux2Config(decoder_block_out_channels=(128, 256, 512, 500))
    with pytest.raises(ConfigError, match="batch_norm_eps must be positive"):
        AutoencoderKLFlux2Config(batch_norm_eps=0.0)
    with pytest.raises(ConfigError, match="no scalar latent factors"):
        AutoencoderKLFlux2Config(scaling_factor=0.5)
    with pytest.raises(ConfigError, match="patch_size"):
        AutoencoderKLFlux2Config(patch_size=(2, 2, 2))


# ---------------------------------------------------------------------- outputs against diffusers
@pytest.mark.parametrize("fields", [SYMMETRIC, ASYMMETRIC], ids=["symmetric", "asymmetric"])
def test_outputs_equal_diffusers(fields):
    theirs, ours = flux2_pair(fields)
    x = torch.rand(3, 3, 18, 14, generator=torch.Generator().manual_seed(2)) * 2 - 1   # odd latent sizes, batch 3
    for a, b, name in zip(_outputs(ours, x), _outputs(theirs, x), ("mean", "logvar", "decoded", "forward")):
        assert rel_err(a, b) <= 1e-5, name


def test_folders_move_both_ways_and_the_wrong_class_is_named(tmp_path):
    theirs, ours = flux2_pair(ASYMMETRIC, seed=3)
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["decoder_block_out_channels"] == [12, 8]
    assert "scaling_factor" not in config
    loaded = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "ours").eval()
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    for a, b in zip(_outputs(loaded, x), _outputs(ours, x)):
        assert rel_err(a, b) <= 1e-5
    assert torch.equal(loaded.bn.running_var, ours.bn.running_var)
    theirs.save_pretrained(tmp_path / "theirs")
    back = klvae.AutoencoderKLFlux2.from_pretrained(tmp_path / "theirs")
    assert back.config == ours.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in theirs.state_dict().items())

    with pytest.raises(ConfigError, match="load it with klvae.AutoencoderKLFlux2"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "ours")
    klvae.AutoencoderKL(**SD_LIKE).save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="load it with klvae.AutoencoderKL "):
        klvae.AutoencoderKLFlux2.from_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="AutoencoderKLFlux2"):
        klvae.AutoencoderKL(config=preset("flux2"))


# ---------------------------------------------------------------------- latent normalisation
def test_patchify_is_the_pipelines_and_inverts():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = torch.randn(2, 32, 6, 10)
    assert torch.equal(patchify(z), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)
    assert np.array_equal(patchify(z.numpy()), patchify(z).numpy())
    # channel-major by hand: channel c's 2x2 patch at (i, j) is channels 4c..4c+3, row by row
    assert torch.equal(patchify(z)[:, 4 * 5 + 2, 1, 3], z[:, 5, 2 * 1 + 1, 2 * 3 + 0])
    with pytest.raises(InputShapeError, match="multiples of the patch"):
        patchify(torch.zeros(1, 32, 5, 4))


def test_scale_latents_is_the_pipelines_normalisation():
    _, ours = flux2_pair(SYMMETRIC, seed=5)
    z = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    mean = ours.bn.running_mean.double().view(1, -1, 1, 1)
    std = torch.sqrt(ours.bn.running_var.double().view(1, -1, 1, 1) + 1e-4)
    expected = (patchify(z) - mean) / std                           # what FLUX.2's pipeline computes
    scaled = klvae.scale_latents(z, ours)
    assert scaled.shape == (2, 16, 3, 4) and rel_err(scaled, expected) <= 1e-12
    assert rel_err(klvae.unscale_latents(scaled, ours), z) <= 1e-12
    assert np.allclose(klvae.scale_latents(z.numpy(), ours), expected.numpy(), rtol=1e-12, atol=1e-12)
    scaling = klvae.latent_scaling(ours)
    assert klvae.LatentScaling.from_mapping(json.loads(json.dumps(scaling.to_dict()))) == scaling
    # the log-variance moves into the same space: patchified, minus 2 log std
    logvar = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    assert rel_err(scaling.scale_logvar(logvar), patchify(logvar) - 2 * torch.log(std)) <= 1e-12
    with pytest.raises(ConfigError, match="pass the model"):
        klvae.scale_latents(z, ours.config)
    assert batch_norm_scaling(ours.bn.running_mean, ours.bn.running_var, 1e-4) == scaling


# ---------------------------------------------------------------------- BFL's single file
def _bfl_file(tmp_path, model, name="ae.safetensors"):
    """The model in BFL's ae.safetensors layout, written with the tests' own key map (no klvae metadata)."""
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in to_ldm(model.state_dict(), {**INFERABLE, "flux2": True}).items()},
              str(path))
    return str(path)


def test_bfl_single_file_loads_infers_and_writes_back_bit_exact(tmp_path):
    theirs, ours = flux2_pair(INFERABLE, seed=7)
    path = _bfl_file(tmp_path, theirs)
    keys = set(load_file(path))
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "bn.running_var"} <= keys
    assert "quant_conv.weight" not in keys
    loaded = klvae.AutoencoderKLFlux2.from_single_file(path)
    assert loaded.config == ours.config                               # widths, decoder widths, patch from weights
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in theirs.state_dict().items())
    out = tmp_path / "out.safetensors"
    loaded.save_single_file(str(out))
    a, b = load_file(path), load_file(str(out))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert klvae.AutoencoderKLFlux2.from_single_file(str(out)).config == ours.config   # from the metadata


def test_a_flux2_file_is_never_taken_for_another_model(tmp_path):
    theirs, _ = flux2_pair(INFERABLE, seed=8)
    path = _bfl_file(tmp_path, theirs)
    with pytest.raises(WeightsError, match="load it with klvae.AutoencoderKLFlux2"):
        klvae.AutoencoderKL.from_single_file(path)
    for family in ("flux", "sd3"):
        with pytest.raises(WeightsError, match="this is FLUX.2's VAE"):
            klvae.AutoencoderKL.from_single_file(path, config=family)
    flux1 = tmp_path / "flux1.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm(random_diffusers(SD_LIKE).state_dict(), SD_LIKE).items()},
              str(flux1))
    with pytest.raises(WeightsError, match="holds an AutoencoderKL .* load it with klvae.AutoencoderKL"):
        with pytest.warns(UserWarning, match="assuming SD 1.x"):
            klvae.AutoencoderKLFlux2.from_single_file(str(flux1))
    with pytest.raises(WeightsError, match="no FLUX.2 latent statistics"):
        klvae.AutoencoderKLFlux2.from_single_file(str(flux1), config="flux2")


# ---------------------------------------------------------------------- everything else works for it
def test_tiling_slicing_attention_processors():
    theirs, ours = flux2_pair(ASYMMETRIC, seed=9)
    z = torch.randn(2, 4, 37, 29, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 74, 58, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        untiled, mean = ours.decode(z).sample, ours.encode(x).latent_dist.mean
        ours.enable_tiling("exact", tile_sample_min_size=16)
        assert rel_err(ours.decode(z).sample, untiled) <= 1e-5
        assert rel_err(ours.encode(x).latent_dist.mean, mean) <= 1e-5
        ours.enable_tiling("blend", tile_sample_min_size=16)
        theirs.enable_tiling()
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = 16, 8
        assert rel_err(ours.decode(z).sample, theirs.decode(z).sample) <= 1e-5
        ours.disable_tiling()
        ours.enable_slicing()
        ours.set_attn_processor(klvae.AttnProcessor())
        assert rel_err(ours.decode(z).sample, untiled) <= 1e-5


def test_gradient_checkpointing_and_float16_fallback():
    _, ours = flux2_pair(SYMMETRIC, seed=10)
    x = torch.rand(2, 3, 16, 12) * 2 - 1

    def grads(model):
        model.zero_grad(set_to_none=True)
        (model(x).sample - x).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(ours.train())
    ours.enable_gradient_checkpointing()
    checkpointed = grads(ours)
    assert all(rel_err(checkpointed[n], plain[n]) <= 1e-5 for n in plain if plain[n].abs().max() > 0)
    half = ours.eval().half()
    with torch.no_grad():
        assert half.decode(torch.randn(1, 4, 4, 4).half()).sample.dtype == torch.float16
    assert half.bn.running_mean.dtype == torch.float16     # buffers follow .to(), as in diffusers


def test_flux2_pipeline_gives_diffusers_images():
    """A klvae FLUX.2 VAE as ``vae=`` of diffusers' Flux2Pipeline (image conditioning included: it encodes and
    normalises with vae.bn) gives the images diffusers' own VAE gives."""
    from PIL import Image

    theirs, ours = flux2_pair(ASYMMETRIC, seed=11)

    def run(vae):
        torch.manual_seed(0)
        transformer = diffusers.Flux2Transformer2DModel(
            in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)).eval()
        pipe = diffusers.Flux2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=None, tokenizer=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
        embeds = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
        return pipe(image=image, prompt_embeds=embeds, height=64, width=96, num_inference_steps=2,
                    guidance_scale=2.0, generator=torch.Generator().manual_seed(1), output_type="np").images

    expected, got = run(theirs), run(ours)
    assert expected.shape == (1, 64, 96, 3) and expected.std() > 0.01
    assert np.abs(got - expected).max() <= 1e-4


def test_update_latent_statistics_is_batch_norms_rule():
    _, ours = flux2_pair(SYMMETRIC, seed=12)
    z = torch.randn(3, 4, 6, 8, dtype=torch.float32)
    old_mean, old_var = ours.bn.running_mean.double().clone(), ours.bn.running_var.double().clone()
    ours.update_latent_statistics(z)
    p = patchify(z.double())
    batch_mean = p.mean(dim=(0, 2, 3))
    batch_var = p.var(dim=(0, 2, 3), unbiased=True)           # BatchNorm's running variance is unbiased
    assert rel_err(ours.bn.running_mean, 0.9 * old_mean + 0.1 * batch_mean) <= 1e-6
    assert rel_err(ours.bn.running_var, 0.9 * old_var + 0.1 * batch_var) <= 1e-6
    assert not ours.bn.training and int(ours.bn.num_batches_tracked) == 4322


def test_trainer_keeps_statistics_unless_asked(tmp_path):
    from test_train import _config

    from klvae.torch.train.trainer import Trainer

    _, source = flux2_pair(SYMMETRIC, seed=13)
    source.save_pretrained(tmp_path / "vae")
    before = {k: v.clone() for k, v in source.bn.state_dict().items()}
    model = {"preset": None, "config": {}, "pretrained": str(tmp_path / "vae")}
    t = Trainer(_config(tmp_path / "a", model=model), resume=False)
    assert type(t.model).__name__ == "AutoencoderKLFlux2"
    t.train_step()
    assert all(torch.equal(v, t.model.bn.state_dict()[k]) for k, v in before.items())
    t = Trainer(_config(tmp_path / "b", model={**model, "update_latent_statistics": True}), resume=False)
    t.train_step()
    assert not torch.equal(before["running_mean"], t.model.bn.running_mean)
    with pytest.raises(ConfigError, match="FLUX.2's VAE"):
        Trainer(_config(tmp_path / "c", model={"update_latent_statistics": True}), resume=False)


def test_default_tiling_splits_a_1024_image_unlike_diffusers_sample_size_tiles():
    """FLUX.2's sample_size is 1024, so diffusers' enable_tiling() leaves a 1024x1024 image whole; klvae's exact
    plan splits it (the untiled output in less memory), and "auto" splits it when memory is short."""
    from klvae.tiling import exact_plan_for, fits_untiled
    from klvae.tiling_plan import untiled_estimate

    config, latent = preset("flux2"), (128, 128)
    untiled_peak = untiled_estimate(config, "decode", latent, 1, 4)[0]
    plan = exact_plan_for(config, "decode", latent, 1, 4, 1024, None, 16 << 30)
    assert plan.grid.count > 1 and plan.peak_bytes <= 0.5 * untiled_peak
    assert exact_plan_for(config, "decode", (64, 64), 1, 4, 1024, None, 16 << 30).grid.count == 1   # 512 px: whole
    assert fits_untiled(config, "decode", latent, 1, 4, None, 64 << 30)
    assert not fits_untiled(config, "decode", latent, 1, 4, None, untiled_peak)        # auto tiles when short
    assert exact_plan_for(config, "decode", latent, 1, 4, 2048, None, 16 << 30).grid.count == 1      # user's tile wins


@pytest.mark.slow  # the default suite compiles the same encoder/decoder code in test_fast_paths
def test_compile_fullgraph():
    import torch._dynamo

    _, ours = flux2_pair(ASYMMETRIC, seed=14)
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    decode = torch.compile(lambda v: ours.decode(v).sample, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert rel_err(decode(z), ours.decode(z).sample) <= 1e-5
