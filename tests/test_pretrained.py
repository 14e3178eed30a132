"""Folders in diffusers' layout: written here and read by diffusers, and the reverse; strict, safe loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae
from klvae import StateDictMismatchError, WeightsError


@pytest.fixture
def pair():
    return diffusers_pair(TINY_CONFIGS["sd3_like_16ch"])


def _x():
    return torch.rand(2, 3, 10, 14, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_our_folder_loads_in_diffusers(pair, tmp_path):
    import diffusers

    theirs, ours = pair
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert loaded.config.shift_factor == 0.0609 and loaded.config.latent_channels == 16
    with torch.no_grad():
        assert rel_err(loaded(_x()).sample, ours(_x()).sample) <= 1e-5
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_diffusers_folder_loads_here(pair, tmp_path):
    theirs, _ = pair
    theirs.save_pretrained(tmp_path)
    ours = klvae.AutoencoderKL.from_pretrained(tmp_path)
    assert not ours.training and ours.config.scaling_factor == 1.5305
    with torch.no_grad():
        assert rel_err(ours(_x()).sample, theirs(_x()).sample) <= 1e-5


def test_loading_does_not_initialise_real_tensors(pair, tmp_path, monkeypatch):
    pair[0].save_pretrained(tmp_path)
    devices = []
    original = torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self: devices.append(self.weight.device.type) or original(self))
    model = klvae.AutoencoderKL.from_pretrained(tmp_path)
    assert devices and set(devices) == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_variant_dtype_and_subfolder(pair, tmp_path):
    import diffusers

    theirs, ours = pair
    ours.to(torch.float16).save_pretrained(tmp_path / "vae", variant="fp16")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = klvae.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    as_fp32 = klvae.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", variant="fp16")
    assert as_fp32.dtype == torch.float32
    bf16 = klvae.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", variant="fp16", torch_dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    theirs_fp16 = diffusers.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", variant="fp16",
                                                          torch_dtype=torch.float16)
    for k, v in half.state_dict().items():
        assert torch.equal(theirs_fp16.state_dict()[k], v)
    with pytest.raises(WeightsError, match="no weights file found"):
        klvae.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")


def test_legacy_bin_and_sharded_folders(pair, tmp_path):
    theirs, _ = pair
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path / "sharded"))
    for folder in ("bin", "sharded"):
        ours = klvae.AutoencoderKL.from_pretrained(tmp_path / folder)
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), (folder, k)


def test_legacy_attention_key_names_are_renamed(pair, tmp_path):
    from safetensors.torch import save_file

    theirs, ours = pair
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in theirs.state_dict().items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        sd[k] = v.contiguous()
    assert any(".query." in k for k in sd)
    ours.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = klvae.AutoencoderKL.from_pretrained(tmp_path)
    for k, v in theirs.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_strict_loading_lists_bad_keys(pair, tmp_path):
    from safetensors.torch import save_file

    _, ours = pair
    ours.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in ours.state_dict().items()}
    del sd["encoder.conv_in.bias"]
    sd["decoder.conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(StateDictMismatchError) as info:
        klvae.AutoencoderKL.from_pretrained(tmp_path)
    err = info.value
    assert err.missing == ["encoder.conv_in.bias"] and err.unexpected == ["extra.weight"]
    assert err.mismatched == {"decoder.conv_out.weight": ((3, 8, 3, 3), (3, 8, 1, 1))}
    assert "diffusion_pytorch_model.safetensors" in str(err) and "extra.weight" in str(err)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_weights_raise_typed_errors(pair, tmp_path, damage):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\xff" * 64}[damage])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        klvae.AutoencoderKL.from_pretrained(tmp_path)


def test_pickles_with_code_never_run(pair, tmp_path):
    import pickle

    _, ours = pair
    ours.save_pretrained(tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"encoder.conv_in.weight": Exploit()}, f, protocol=2)
    with pytest.raises(WeightsError, match="weights-only"):
        klvae.AutoencoderKL.from_pretrained(tmp_path)
    assert not marker.exists()


def test_missing_and_non_model_folders(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        klvae.AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="no such folder"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "nope" / "deeper")


def test_save_is_atomic_and_refuses_a_file_target(pair, tmp_path):
    _, ours = pair
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        ours.save_pretrained(target)
    ours.save_pretrained(tmp_path / "out")
    ours.save_pretrained(tmp_path / "out")  # overwrite in place
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "diffusion_pytorch_model.safetensors"]


def _fill_hub_cache(cache: str, repo_id: str, src_folder: str, subfolder: str = "vae") -> None:
    """Lay out files as huggingface_hub's cache does (models--org--name/{refs,snapshots})."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    snap = os.path.join(root, "snapshots", commit, subfolder)
    os.makedirs(snap)
    for name in os.listdir(src_folder):
        with open(os.path.join(src_folder, name), "rb") as a, open(os.path.join(snap, name), "wb") as b:
            b.write(a.read())


def test_hub_ids_resolve_from_the_cache_offline(pair, tmp_path, monkeypatch):
    _, ours = pair
    ours.save_pretrained(tmp_path / "src")
    cache = str(tmp_path / "cache")
    _fill_hub_cache(cache, "someone/tiny-vae", str(tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = klvae.AutoencoderKL.from_pretrained("someone/tiny-vae", subfolder="vae", cache_dir=cache)
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    loaded = klvae.AutoencoderKL.from_pretrained("someone/tiny-vae", subfolder="vae", cache_dir=cache,
                                                 local_files_only=True)
    with pytest.raises(WeightsError, match="not in the hub cache"):
        klvae.AutoencoderKL.from_pretrained("someone/other-vae", cache_dir=cache, local_files_only=True)


def test_config_json_written_is_diffusers_style(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_class_name"] == "AutoencoderKL"
    assert data["block_out_channels"] == [8, 16] and data["use_quant_conv"] is False


def test_atomic_writes_get_a_normal_file_mode(tmp_path):
    import klvae.fileio as fileio

    fileio.atomic_write_bytes(str(tmp_path / "a.json"), b"{}")
    # Not mkstemp's private 0600: the mode an ordinary open() would give under the process umask.
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~fileio._UMASK
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    assert os.stat(probe).st_mode & 0o777 == 0o666 & ~fileio._UMASK
