"""Export to the original layout and round trips: diffusers <-> original, bit-exact, both directions."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_single_file import (FLUX_LIKE, SD_LIKE, assert_same_outputs, ldm_pairs, random_diffusers,  # noqa: E402
                              to_ldm)

import klvae  # noqa: E402
from klvae.config import PRESETS  # noqa: E402
from klvae.weights.layout import state_dict_shapes  # noqa: E402
from klvae.weights.original import diffusers_to_original, original_to_diffusers  # noqa: E402


class _Shaped:
    """A stand-in tensor with only a shape, so real-size layouts are mapped without allocating them."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def reshape(self, shape):
        return _Shaped(shape)


def assert_bit_exact(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        bits_a = a[key].reshape(-1).contiguous().view(torch.uint8)
        assert torch.equal(bits_a, b[key].reshape(-1).contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("name", list(PRESETS))
def test_key_map_agrees_with_the_tests_map_on_every_preset(name):
    config = PRESETS[name]
    shapes = state_dict_shapes(config)
    fields = {"block_out_channels": config.block_out_channels, "layers_per_block": config.layers_per_block,
              "flux2": config.latent_patch_size is not None}
    expected = {d: o for d, o in ldm_pairs(fields) if d in shapes}
    assert len(expected) == len(shapes)
    original = diffusers_to_original({k: _Shaped(s) for k, s in shapes.items()})
    assert set(original) == set(expected.values())
    for d, o in expected.items():
        want = shapes[d] + ((1, 1) if len(shapes[d]) == 2 else ())
        assert original[o].shape == want, (d, o)
    back = original_to_diffusers(original)
    assert {k: v.shape for k, v in back.items()} == shapes


@pytest.mark.parametrize("fields", [SD_LIKE, FLUX_LIKE], ids=["sd", "flux"])
@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_original_file_round_trip_is_bit_exact(tmp_path, fields, prefix):
    """original file -> from_single_file -> save_single_file gives the same keys, shapes, dtypes and bits."""
    ref = random_diffusers(fields, seed=11)
    source = to_ldm(ref.state_dict(), fields, prefix)
    src = str(tmp_path / "in.safetensors")
    save_file(source, src)
    model = klvae.AutoencoderKL.from_single_file(src, config=dict(fields))
    out = str(tmp_path / "out.safetensors")
    model.save_single_file(out, prefix=prefix)
    assert_bit_exact(load_file(out), source)


def test_diffusers_round_trip_is_bit_exact_in_half_precision(tmp_path):
    """diffusers weights -> original file -> diffusers weights, bf16 and fp16 kept bit for bit."""
    ref = random_diffusers(SD_LIKE, seed=12)
    for dtype in (torch.bfloat16, torch.float16):
        model = klvae.AutoencoderKL(**SD_LIKE).to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
        path = str(tmp_path / f"vae_{dtype}.safetensors")
        model.save_single_file(path)
        with safe_open(path, "pt") as f:
            assert f.get_tensor("encoder.mid.attn_1.q.weight").shape[2:] == (1, 1)
            assert f.get_tensor("decoder.up.1.block.0.conv1.weight").dtype == dtype
        back = klvae.AutoencoderKL.from_single_file(path, torch_dtype=dtype)
        assert back.config == model.config
        assert_bit_exact(back.state_dict(), model.state_dict())


def test_export_matches_the_tests_map_and_loads_in_diffusers(tmp_path):
    """Our export is what the tests' independent map writes, and diffusers' from_single_file reads it."""
    ref = random_diffusers(FLUX_LIKE, seed=13)
    ref.save_pretrained(tmp_path / "folder")
    model = klvae.AutoencoderKL.from_pretrained(tmp_path / "folder")
    path = str(tmp_path / "ae.safetensors")
    model.save_single_file(path, prefix="first_stage_model.")
    assert_bit_exact(load_file(path), to_ldm(ref.state_dict(), FLUX_LIKE, "first_stage_model."))
    theirs = diffusers.AutoencoderKL.from_single_file(path, config=str(tmp_path / "folder"), local_files_only=True)
    assert_same_outputs(model, theirs)


def test_ckpt_export_holds_a_state_dict_and_reads_back(tmp_path):
    ref = random_diffusers(SD_LIKE, seed=14)
    model = klvae.AutoencoderKL(**SD_LIKE)
    model.load_state_dict(ref.state_dict())
    path = str(tmp_path / "vae.ckpt")
    model.save_single_file(path, dtype="fp16")
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"state_dict"}
    expected = {k: v.half() for k, v in to_ldm(ref.state_dict(), SD_LIKE).items()}
    assert_bit_exact(obj["state_dict"], expected)
    back = klvae.AutoencoderKL.from_single_file(path, config=dict(SD_LIKE), torch_dtype=torch.float16)
    assert_bit_exact(back.state_dict(), {k: v.half() for k, v in ref.state_dict().items()})


def test_legacy_attention_names_in_a_diffusers_layout_file(tmp_path):
    ref = random_diffusers(SD_LIKE, seed=15)
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value.contiguous()
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    path = str(tmp_path / "old.safetensors")
    save_file(legacy, path)
    model = klvae.AutoencoderKL.from_single_file(path, config=dict(SD_LIKE))
    assert_bit_exact(model.state_dict(), ref.state_dict())


def test_training_only_keys_are_skipped(tmp_path):
    """LDM training checkpoints carry LPIPS/discriminator weights under loss.*; they are not VAE weights."""
    ref = random_diffusers(SD_LIKE, seed=16)
    tensors = {**to_ldm(ref.state_dict(), SD_LIKE), "loss.logvar": torch.zeros(()),
               "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}
    path = str(tmp_path / "kl-f8.ckpt")
    torch.save({"state_dict": tensors}, path)
    from klvae.weights.single_file import read_single_file

    weights = read_single_file(path, klvae.AutoencoderKLConfig(**SD_LIKE))
    assert sorted(weights.ignored) == ["loss.discriminator.main.0.weight", "loss.logvar"]
    assert_bit_exact(weights.state_dict, ref.state_dict())
