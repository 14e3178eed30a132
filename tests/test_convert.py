"""``klvae convert`` between diffusers folders, original single files and Flax folders."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_single_file import FLUX_LIKE, SD_LIKE, fake_full_checkpoint, random_diffusers, to_ldm  # noqa: E402

from klvae.cli import main  # noqa: E402


def assert_same_tensors(a: dict, b: dict, dtype=None) -> None:
    assert set(a) == set(b)
    for key in a:
        want = b[key] if dtype is None else b[key].to(dtype)
        assert a[key].dtype == want.dtype and torch.equal(a[key], want), key


def folder_weights(folder) -> dict:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def folder_config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


@pytest.fixture
def diffusers_folder(tmp_path):
    ref = random_diffusers(FLUX_LIKE, seed=21)
    folder = str(tmp_path / "diffusers")
    ref.save_pretrained(folder)
    return folder


def test_diffusers_to_single_file_and_back_is_bit_exact(tmp_path, diffusers_folder, capsys):
    single = str(tmp_path / "ae.safetensors")
    assert main(["convert", diffusers_folder, single]) == 0
    assert "single-file" in capsys.readouterr().out
    ref = random_diffusers(FLUX_LIKE, seed=21)
    assert_same_tensors(load_file(single), to_ldm(ref.state_dict(), FLUX_LIKE))
    back = str(tmp_path / "back")
    assert main(["convert", single, back]) == 0  # config restored from the file's metadata: no ambiguity
    assert_same_tensors(folder_weights(back), folder_weights(diffusers_folder))
    assert folder_config(back) == folder_config(diffusers_folder)


def test_dtype_cast_and_kept(tmp_path, diffusers_folder):
    half = str(tmp_path / "ae_bf16.safetensors")
    assert main(["convert", diffusers_folder, half, "--dtype", "bf16", "--prefix", "first_stage_model."]) == 0
    tensors = load_file(half)
    assert all(k.startswith("first_stage_model.") for k in tensors)
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    folder = str(tmp_path / "bf16_folder")
    assert main(["convert", half, folder]) == 0  # no --dtype: bf16 stays bf16
    assert_same_tensors(folder_weights(folder), folder_weights(diffusers_folder), torch.bfloat16)
    ckpt = str(tmp_path / "vae.ckpt")
    assert main(["convert", folder, ckpt, "--dtype", "fp32"]) == 0
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values()} == {torch.float32}


def test_full_checkpoint_to_diffusers_folder_loads_in_diffusers(tmp_path):
    ref = random_diffusers(SD_LIKE, seed=22)
    ckpt = str(tmp_path / "sd_full.ckpt")
    torch.save({"state_dict": {**fake_full_checkpoint("sdxl"), **to_ldm(ref.state_dict(), SD_LIKE,
                                                                          "first_stage_model.")}}, ckpt)
    out = str(tmp_path / "sdxl_vae")
    assert main(["convert", ckpt, out]) == 0
    assert folder_config(out)["scaling_factor"] == 0.13025
    loaded = diffusers.AutoencoderKL.from_pretrained(out)
    assert_same_tensors(loaded.state_dict(), ref.state_dict())


def test_ambiguous_input_needs_config(tmp_path, capsys):
    ref = random_diffusers(FLUX_LIKE, seed=23)
    src = str(tmp_path / "ae.safetensors")
    save_file(to_ldm(ref.state_dict(), FLUX_LIKE), src)
    out = str(tmp_path / "out")
    assert main(["convert", src, out]) == 2
    assert "config='flux'" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["convert", src, out, "--config", "sd3"]) == 2  # sd3 preset is SDXL-sized: shapes differ
    assert "do not fit" in capsys.readouterr().err and not os.path.exists(out)
    config_dir = str(tmp_path / "cfg")
    ref.save_pretrained(config_dir)
    assert main(["convert", src, out, "--config", config_dir]) == 0
    assert folder_config(out)["shift_factor"] == 0.1159


def test_existing_output_and_failures_leave_no_partial_output(tmp_path, diffusers_folder, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", diffusers_folder, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]

    import klvae.torch.loading as loading

    def broken_save(self, directory, **kwargs):
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "config.json"), "w").write("{}")
        raise OSError("disk full")

    monkeypatch.setattr(loading.PretrainedMixin, "save_pretrained", broken_save)
    assert main(["convert", diffusers_folder, str(out), "--overwrite"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["diffusers", "out"] and os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    assert main(["convert", diffusers_folder, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["diffusers", "out"]


def test_bad_arguments(tmp_path, diffusers_folder, capsys):
    assert main(["convert", diffusers_folder, str(tmp_path / "x.safetensors"), "--config", "flux"]) == 2
    assert "--config applies to single-file inputs" in capsys.readouterr().err
    assert main(["convert", diffusers_folder, str(tmp_path / "x"), "--to", "single-file"]) == 2
    assert "needs one of the suffixes" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["diffusers"]


def test_flax_folder_round_trip(tmp_path, diffusers_folder):
    pytest.importorskip("flax")
    import numpy as np
    from flax.serialization import msgpack_restore

    flax_dir = str(tmp_path / "flax")
    assert main(["convert", diffusers_folder, flax_dir, "--to", "flax"]) == 0
    with open(os.path.join(flax_dir, "diffusion_flax_model.msgpack"), "rb") as f:
        params = msgpack_restore(f.read())
    torch_w = folder_weights(diffusers_folder)
    kernel = params["encoder"]["conv_in"]["kernel"]  # diffusers' Flax names, HWIO kernels
    np.testing.assert_array_equal(kernel, torch_w["encoder.conv_in.weight"].numpy().transpose(2, 3, 1, 0))
    single = str(tmp_path / "from_flax.safetensors")
    assert main(["convert", flax_dir, single]) == 0
    ref = random_diffusers(FLUX_LIKE, seed=21)
    assert_same_tensors(load_file(single), to_ldm(ref.state_dict(), FLUX_LIKE))
