"""from_single_file on original-layout files, against diffusers' own from_single_file on the same file.

The original-layout files are written here from random diffusers weights through ``ldm_pairs`` below, a key map
written for the tests independently of klvae.weights.original (explicit loops over the architecture instead of
klvae's template table).
"""

from __future__ import annotations

import os
import warnings

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import perturb_, rel_err  # noqa: E402

import klvae  # noqa: E402
from klvae.weights.infer import AmbiguousConfigWarning  # noqa: E402

SD_LIKE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
FLUX_LIKE = dict(SD_LIKE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159)


# ---------------------------------------------------------------------- the tests' own key map
def ldm_pairs(fields: dict) -> list[tuple[str, str]]:
    """(diffusers key, original LDM key) for every weight a config can have (shortcuts included; filter by
    the model's state dict)."""
    n = len(fields["block_out_channels"])
    layers = fields.get("layers_per_block", 2)
    pairs: list[tuple[str, str]] = []

    def both(diff: str, orig: str) -> None:
        pairs.append((diff + ".weight", orig + ".weight"))
        pairs.append((diff + ".bias", orig + ".bias"))

    def resnet(diff: str, orig: str) -> None:
        for leaf in ("norm1", "conv1", "norm2", "conv2"):
            both(f"{diff}.{leaf}", f"{orig}.{leaf}")
        both(f"{diff}.conv_shortcut", f"{orig}.nin_shortcut")

    def mid(side: str) -> None:
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        a, o = f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1"
        both(f"{a}.group_norm", f"{o}.norm")
        for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            both(f"{a}.{new}", f"{o}.{old}")

    for side in ("encoder", "decoder"):
        both(f"{side}.conv_in", f"{side}.conv_in")
        both(f"{side}.conv_out", f"{side}.conv_out")
        both(f"{side}.conv_norm_out", f"{side}.norm_out")
        mid(side)
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        both(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        level = n - 1 - i  # the original numbers decoder levels from the lowest resolution's last
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        both(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    if fields.get("flux2"):  # BFL's FLUX.2 file: quant convs inside encoder/decoder, BatchNorm buffers on top
        both("quant_conv", "encoder.quant_conv")
        both("post_quant_conv", "decoder.post_quant_conv")
        pairs.extend((k, k) for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"))
    else:
        both("quant_conv", "quant_conv")
        both("post_quant_conv", "post_quant_conv")
    return pairs


def to_ldm(state_dict: dict, fields: dict, prefix: str = "") -> dict:
    """A diffusers state dict in the original layout (attention projections as 1x1 convs)."""
    table = dict(ldm_pairs(fields))
    missing = [k for k in state_dict if k not in table]
    assert not missing, f"test key map lacks {missing}"
    out = {}
    for key, value in state_dict.items():
        if key.split(".")[-2] in ("to_q", "to_k", "to_v") or ".to_out.0.weight" in key:
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[prefix + table[key]] = value.detach().clone().contiguous()
    return out


def random_diffusers(fields: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**fields)
    perturb_(model, seed=seed)
    return model.eval()


def fake_full_checkpoint(family: str) -> dict:
    """Small stand-ins for a full checkpoint's non-VAE tensors, with the key names of ``family``."""
    g = torch.Generator().manual_seed(1)
    names = {"sd1": ["model.diffusion_model.input_blocks.0.0.weight",
                     "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
             "sdxl": ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.w"],
             "flux": ["double_blocks.0.img_attn.qkv.weight", "final_layer.linear.weight"],
             "sd3": ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]}[family]
    return {n: torch.randn(8, 4, generator=g) for n in names}


def write_safetensors(tensors: dict, path) -> str:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return str(path)


def outputs(model, x):
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        return posterior.mean, posterior.logvar, model.decode(posterior.mean).sample


def assert_same_outputs(ours, theirs, in_channels=3, tol=1e-5):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, in_channels, 16, 24, generator=g) * 2 - 1
    for a, b, name in zip(outputs(ours, x), outputs(theirs, x), ("mean", "logvar", "decoded"), strict=True):
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err}"


# ---------------------------------------------------------------------- the tests' map itself
def test_test_key_map_covers_diffusers_exactly():
    """The independent map must name every diffusers key once and produce distinct original keys."""
    for fields in (SD_LIKE, FLUX_LIKE, dict(SD_LIKE, block_out_channels=(32, 32, 64), layers_per_block=2,
                                            down_block_types=("DownEncoderBlock2D",) * 3,
                                            up_block_types=("UpDecoderBlock2D",) * 3)):
        sd = random_diffusers(fields).state_dict()
        ldm = to_ldm(sd, fields)
        assert len(ldm) == len(sd)
        assert "decoder.up.0.block.0.conv1.weight" in ldm and "decoder.up_blocks" not in " ".join(ldm)


# ---------------------------------------------------------------------- parity with diffusers
def test_sd_style_inside_full_checkpoint_config_inferred(tmp_path):
    """SD-style: VAE under first_stage_model. in a bigger checkpoint; our config is inferred, diffusers gets
    a local config folder; weights and outputs agree, and so does the original diffusers model."""
    ref = random_diffusers(SD_LIKE, seed=1)
    folder = tmp_path / "config"
    ref.save_pretrained(folder)
    ckpt = {**fake_full_checkpoint("sd1"), **to_ldm(ref.state_dict(), SD_LIKE, "first_stage_model.")}
    path = write_safetensors(ckpt, tmp_path / "sd_full.safetensors")

    ours = klvae.AutoencoderKL.from_single_file(path)
    theirs = diffusers.AutoencoderKL.from_single_file(path, config=str(folder), local_files_only=True)
    assert ours.config.block_out_channels == (32, 64) and ours.config.latent_channels == 4
    assert ours.config.scaling_factor == pytest.approx(0.18215)  # sd1 family, from the text encoder's keys
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key in theirs_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert_same_outputs(ours, theirs)
    assert_same_outputs(ours, ref)


def test_flux_style_bare_16_channels(tmp_path):
    """FLUX-style: bare file, 16 latent channels, no quant convs, config from a local folder."""
    ref = random_diffusers(FLUX_LIKE, seed=2)
    folder = tmp_path / "config"
    ref.save_pretrained(folder)
    path = write_safetensors(to_ldm(ref.state_dict(), FLUX_LIKE), tmp_path / "ae.safetensors")

    ours = klvae.AutoencoderKL.from_single_file(path, config=str(folder))
    theirs = diffusers.AutoencoderKL.from_single_file(path, config=str(folder), local_files_only=True)
    assert not ours.config.use_quant_conv and ours.config.latent_channels == 16
    assert ours.config.shift_factor == pytest.approx(0.1159)
    assert_same_outputs(ours, theirs)
    assert_same_outputs(ours, ref)


def test_flux_style_inside_flux_checkpoint_infers_flux_factors(tmp_path):
    ref = random_diffusers(FLUX_LIKE, seed=3)
    ckpt = {**fake_full_checkpoint("flux"), **to_ldm(ref.state_dict(), FLUX_LIKE, "vae.")}
    path = write_safetensors(ckpt, tmp_path / "flux_full.safetensors")
    ours = klvae.AutoencoderKL.from_single_file(path)
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.3611, 0.1159)
    assert_same_outputs(ours, ref)


def test_ckpt_with_nested_state_dict(tmp_path):
    """A .ckpt pickle as the original repos ship them: {"state_dict": {...}, "global_step": ...}."""
    ref = random_diffusers(SD_LIKE, seed=4)
    folder = tmp_path / "config"
    ref.save_pretrained(folder)
    ckpt = {"state_dict": {**fake_full_checkpoint("sdxl"), **to_ldm(ref.state_dict(), SD_LIKE, "first_stage_model.")},
            "global_step": 840000}
    path = str(tmp_path / "model.ckpt")
    torch.save(ckpt, path)
    ours = klvae.AutoencoderKL.from_single_file(path)
    assert ours.config.scaling_factor == pytest.approx(0.13025)  # sdxl, from conditioner.embedders keys
    theirs = diffusers.AutoencoderKL.from_single_file(path, config=str(folder), local_files_only=True)
    assert_same_outputs(ours, theirs)


def test_bare_4_channel_file_warns_and_assumes_sd1(tmp_path):
    ref = random_diffusers(SD_LIKE, seed=5)
    path = write_safetensors(to_ldm(ref.state_dict(), SD_LIKE), tmp_path / "vae.safetensors")
    with pytest.warns(AmbiguousConfigWarning, match="config='sdxl'"):
        ours = klvae.AutoencoderKL.from_single_file(path)
    assert ours.config.scaling_factor == pytest.approx(0.18215)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice is silent
        sdxl = klvae.AutoencoderKL.from_single_file(path, config=dict(SD_LIKE, scaling_factor=0.13025))
    assert sdxl.config.scaling_factor == pytest.approx(0.13025)
    assert_same_outputs(sdxl, ref)


def test_torch_dtype_and_diffusers_layout_single_file(tmp_path):
    """A single file already in diffusers' layout (e.g. a folder's weights file) loads too; torch_dtype casts."""
    ref = random_diffusers(SD_LIKE, seed=6)
    ref.save_pretrained(tmp_path / "folder")
    path = str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    ours = klvae.AutoencoderKL.from_single_file(path, config=str(tmp_path / "folder"), torch_dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value.to(torch.bfloat16)), key


def test_hub_url_from_prefilled_cache_offline(tmp_path, monkeypatch):
    """A hub file URL resolves through huggingface_hub's cache without network in offline mode."""
    import huggingface_hub

    ref = random_diffusers(FLUX_LIKE, seed=8)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-ae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    write_safetensors(to_ldm(ref.state_dict(), FLUX_LIKE), snapshot / "ae.safetensors")
    ref.save_pretrained(snapshot / "vae")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = str(tmp_path / "hub")

    url = "https://huggingface.co/acme/tiny-ae/blob/main/ae.safetensors"
    ours = klvae.AutoencoderKL.from_single_file(url, config="acme/tiny-ae", subfolder="vae", cache_dir=cache)
    assert ours.config.latent_channels == 16
    assert_same_outputs(ours, ref)
    with pytest.raises(klvae.WeightsError, match="not in the hub cache"):
        klvae.AutoencoderKL.from_single_file("https://huggingface.co/acme/tiny-ae/blob/main/other.safetensors",
                                             config="flux", cache_dir=cache)
    assert not os.path.exists(snapshot / "other.safetensors")
