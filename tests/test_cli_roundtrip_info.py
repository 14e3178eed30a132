"""``klvae roundtrip`` (PSNR/SSIM against hand computation, the comparison image) and ``klvae info``."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import saved_model_fixtures

import klvae
from klvae.cli import main
from klvae.images import read_image

FIELDS = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)


model_dir, model = saved_model_fixtures(FIELDS, seed=2)


def _smooth_image(path, h, w, seed):
    """A smooth picture, so the tiny model's reconstruction is not pure noise."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    rng = np.random.default_rng(seed)
    chans = [np.sin(6 * xx * rng.uniform(0.5, 2) + 4 * yy * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in "rgb"]
    a = ((np.stack(chans, -1) + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(a).save(path)
    return a


def test_roundtrip_table_metrics_and_pictures(tmp_path, model_dir, capsys):
    a = _smooth_image(tmp_path / "wave.png", 21, 30, 0)
    _smooth_image(tmp_path / "other.png", 16, 16, 1)
    out = tmp_path / "rt"
    assert main(["roundtrip", str(tmp_path / "wave.png"), str(tmp_path / "other.png"), "-o", str(out), "-m", model_dir,
                 "-q", "--error-scale", "0.2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "size", "PSNR", "dB", "SSIM"] and table[-1].startswith("mean")
    assert sorted(os.listdir(out)) == ["other-compare.png", "other.png", "wave-compare.png", "wave.png"]

    # by hand: encode the padded image, decode the mode, crop, round to 8 bits, compare
    model = klvae.AutoencoderKL.from_pretrained(model_dir).eval()
    x = torch.from_numpy(np.pad(a, ((0, 1), (0, 0), (0, 0)), mode="symmetric").astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        y = model(x.permute(2, 0, 1)[None]).sample[0].permute(1, 2, 0).numpy()[:21]
    recon = np.round(np.clip((y + 1) / 2, 0, 1) * 255)
    mse = np.mean((recon / 255 - a / 255) ** 2)
    row = next(line for line in table if "wave.png" in line).split()
    assert row[1] == "30x21"
    assert float(row[2]) == pytest.approx(10 * math.log10(1 / mse), abs=0.006)
    saved = np.asarray(Image.open(out / "wave.png")).astype(np.float64)
    assert np.abs(saved - recon).max() <= 1
    compare = np.asarray(Image.open(out / "wave-compare.png"))
    assert compare.shape == (21, 3 * 30 + 8, 3)
    np.testing.assert_array_equal(compare[:, :30], a)
    np.testing.assert_array_equal(compare[:, 34:64], saved.astype(np.uint8))


def test_roundtrip_json_16_bits_and_identity_psnr(tmp_path, model_dir, capsys):
    from klvae.images import encode_png

    deep = np.random.default_rng(3).integers(0, 65536, (12, 12, 1)).astype(np.uint16)
    (tmp_path / "deep.png").write_bytes(encode_png(deep))
    assert main(["roundtrip", str(tmp_path / "deep.png"), "-o", str(tmp_path / "o"), "-m", model_dir, "-q",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["size"] == "12x12" and row["latents"] == "4x6x6" and 0 < row["psnr"] < 60
    assert read_image(str(tmp_path / "o" / "deep.png")).bits == 16  # reconstruction keeps the source depth


def test_roundtrip_without_output_writes_nothing_and_defaults_to_the_sample(tmp_path, model_dir, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["roundtrip", "-m", model_dir, "-q"]) == 0
    out = capsys.readouterr().out
    assert "chelsea.png" in out and "451x300" in out
    assert os.listdir(tmp_path) == []


def test_info_folder_and_single_files(tmp_path, model_dir, capsys):
    model = klvae.AutoencoderKL.from_pretrained(model_dir)
    assert main(["info", model_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "diffusers folder" and info["dtype"] == "float32"
    assert info["parameters"]["total"] == model.num_parameters() == sum(p.numel() for p in model.parameters())
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    assert info["parameters"]["encoder"] == enc and info["downsample_factor"] == 2
    assert info["config"]["block_out_channels"] == [8, 16]

    model.half().save_single_file(str(tmp_path / "full.safetensors"), prefix="first_stage_model.")
    assert main(["info", str(tmp_path / "full.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "layout:      single file, original keys, inside a full checkpoint under 'first_stage_model.'" in text
    assert "dtype:       float16" in text and f"parameters:  {model.num_parameters():,}" in text

    klvae.AutoencoderKL(klvae.preset("tiny")).save_single_file(str(tmp_path / "tiny.safetensors"))
    assert main(["info", str(tmp_path / "tiny.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "single file, original keys, a bare VAE" and info["matching_presets"] == ["tiny"]


def test_info_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    assert main(["info", str(tmp_path / "junk.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("klvae: error: ") and len(err.strip().splitlines()) == 1
    os.makedirs(tmp_path / "empty")
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_multi_line_errors_are_joined_on_one_line(tmp_path, model_dir, capsys):
    import shutil

    bad = tmp_path / "mismatch"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["block_out_channels"] = [8, 8]
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "the weights do not fit the model; unexpected keys (4): " in err and "; mis-shaped keys (" in err
    assert len(err.strip().splitlines()) == 1
