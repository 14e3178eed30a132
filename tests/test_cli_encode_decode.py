"""``klvae encode`` and ``klvae decode``: latents equal the model's own, metadata, scaling, padding, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from conftest import saved_model_fixtures

import klvae
from klvae.cli import main
from klvae.images import encode_png, pad_to_multiple, quantize, read_image, to_channels, to_model_input

# Three blocks (factor 4), so odd sizes need padding; SD3-style shift so scaling is not a plain product.
FIELDS = dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, layers_per_block=1,
              scaling_factor=1.5, shift_factor=0.25)


model_dir, model = saved_model_fixtures(FIELDS, seed=1)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, shape in (("rgb", (13, 18, 3)), ("grey", (12, 16)), ("rgba", (9, 11, 4))):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(a).save(paths[name])
    return paths


def _expected_mean(model, path):
    img = read_image(path)
    x = torch.from_numpy(to_model_input(pad_to_multiple(to_channels(img.pixels, 3), 4)))[None]
    with torch.no_grad():
        return model.encode(x).latent_dist.mean


def _read(path):
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("latents"), json.loads(f.metadata()["klvae_latents"])


def test_encode_equals_the_models_encode_with_metadata(tmp_path, model_dir, model, images):
    out = tmp_path / "lat"
    assert main(["encode", *images.values(), "-o", str(out), "-m", model_dir, "-q", "--batch-size", "2"]) == 0
    for name, path in images.items():
        latents, meta = _read(str(out / f"{name}.safetensors"))
        expected = _expected_mean(model, path)
        assert latents.shape == expected.shape == (1, 4, *[-(-s // 4) for s in read_image(path).size])
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
        assert meta["scaled"] is False and meta["posterior"] == "mode" and meta["model"] == model_dir
        assert meta["source_size"] == list(read_image(path).size)
        assert meta["scaling"] == {"scaling_factor": 1.5, "shift_factor": 0.25, "latents_mean": None,
                                   "latents_std": None, "patch_size": None}
        assert meta["config"]["block_out_channels"] == [8, 16, 16]


def test_scaled_latents_and_single_file_output(tmp_path, model_dir, model, images):
    out = tmp_path / "one.safetensors"
    assert main(["encode", images["rgb"], "-o", str(out), "-m", model_dir, "--scaled", "-q"]) == 0
    latents, meta = _read(str(out))
    assert meta["scaled"] is True
    torch.testing.assert_close(latents, (_expected_mean(model, images["rgb"]) - 0.25) * 1.5, rtol=1e-5, atol=1e-6)


def test_sample_is_seeded(tmp_path, model_dir, images):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        assert main(["encode", images["rgb"], "-o", str(out), "-m", model_dir, "--sample", "--seed", str(seed),
                     "-q"]) == 0
    assert torch.equal(_read(str(a))[0], _read(str(b))[0]) and not torch.equal(_read(str(a))[0], _read(str(c))[0])
    assert _read(str(a))[1]["posterior"] == "sample"


def test_decode_undoes_scaling_and_crops_back(tmp_path, model_dir, model, images):
    lat = tmp_path / "lat"
    assert main(["encode", images["rgb"], "-o", str(lat), "-m", model_dir, "--scaled", "-q"]) == 0
    assert main(["decode", str(lat / "rgb.safetensors"), "-o", str(tmp_path / "dec"), "-m", model_dir, "-q"]) == 0
    decoded = np.asarray(Image.open(tmp_path / "dec" / "rgb.png"))
    with torch.no_grad():
        sample = model.decode(_expected_mean(model, images["rgb"])).sample[0]
    expected = quantize(((sample.permute(1, 2, 0).numpy() + 1) / 2)[:13, :18], 8)
    assert decoded.shape == (13, 18, 3)
    assert np.abs(decoded.astype(int) - expected).max() <= 1  # rounding of values a hair from .5


def test_decode_foreign_files_batches_and_16_bits(tmp_path, model_dir, model):
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "batch.npy", z.numpy())
    from safetensors.torch import save_file

    save_file({"a": z[0], "b": z[1]}, str(tmp_path / "two.safetensors"))
    assert main(["decode", str(tmp_path / "batch.npy"), str(tmp_path / "two.safetensors"), "-o",
                 str(tmp_path / "out"), "-m", model_dir, "--bits", "16", "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["batch-0.png", "batch-1.png", "two-a.png", "two-b.png"]
    with torch.no_grad():
        expected = model.decode(z).sample
    for i, name in enumerate(("batch-0", "two-b")):
        img = read_image(str(tmp_path / "out" / f"{name}.png"))
        assert img.bits == 16 and img.size == (12, 20)
        ref = np.clip((expected[i % 2 if name == "batch-0" else 1].permute(1, 2, 0).numpy() + 1) / 2, 0, 1)
        assert np.abs(img.pixels - ref).max() <= 1 / 65535 + 1e-6
    # --scaled on a file without metadata unscales with the model's factors
    assert main(["decode", str(tmp_path / "batch.npy"), "-o", str(tmp_path / "s"), "-m", model_dir, "--scaled",
                 "-q"]) == 0
    with torch.no_grad():
        raw = model.decode(z / 1.5 + 0.25).sample[0]
    got = read_image(str(tmp_path / "s" / "batch-0.png")).pixels
    assert np.abs(got - quantize(np.clip((raw.permute(1, 2, 0).numpy() + 1) / 2, 0, 1), 8) / 255).max() < 1e-6


def test_input_kinds_16bit_exif(tmp_path, model_dir, model):
    a = np.random.default_rng(1).integers(0, 65536, (10, 7, 3)).astype(np.uint16)
    (tmp_path / "deep.png").write_bytes(encode_png(a))
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 8
    im.save(tmp_path / "turned.png", exif=exif)
    assert main(["encode", str(tmp_path), "-o", str(tmp_path / "lat"), "-m", model_dir, "-q"]) == 0
    deep, meta = _read(str(tmp_path / "lat" / "deep.safetensors"))
    x = torch.from_numpy(to_model_input(pad_to_multiple(a.astype(np.float32) / 65535, 4)))[None]
    with torch.no_grad():
        torch.testing.assert_close(deep, model.encode(x).latent_dist.mean, rtol=1e-5, atol=1e-6)
    turned, meta = _read(str(tmp_path / "lat" / "turned.safetensors"))
    assert meta["source_size"] == [9, 6] and turned.shape == (1, 4, 3, 2)


def test_no_overwrite_without_force_and_nothing_written_on_error(tmp_path, model_dir, images, capsys):
    out = tmp_path / "lat"
    assert main(["encode", images["rgb"], "-o", str(out), "-m", model_dir, "-q"]) == 0
    before = _read(str(out / "rgb.safetensors"))[0]
    assert main(["encode", images["rgb"], images["grey"], "-o", str(out), "-m", model_dir, "-q"]) == 2
    err = capsys.readouterr().err
    assert "rgb.safetensors: already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == ["rgb.safetensors"]  # checked before anything was written
    assert main(["encode", images["rgb"], images["grey"], "-o", str(out), "-m", model_dir, "-q", "--force"]) == 0
    assert torch.equal(_read(str(out / "rgb.safetensors"))[0], before) and (out / "grey.safetensors").exists()
    # a bad image among good ones: nothing is written at all
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["encode", images["rgb"], str(tmp_path / "bad.png"), "-o", str(tmp_path / "lat2"), "-m",
                 model_dir, "-q"]) == 2
    assert "bad.png: cannot read as an image" in capsys.readouterr().err
    assert not (tmp_path / "lat2").exists()


@pytest.mark.parametrize("argv,message", [
    (["encode", "{missing}", "-o", "{tmp}/o"], "missing.png: no such file or folder"),
    (["encode", "{rgb}", "-o", "{tmp}/o", "-m", "{tmp}/nomodel"], "--model {tmp}/nomodel: no such file or folder"),
    (["encode", "{rgb}", "{grey}", "-o", "{tmp}/o.safetensors"], "a single file holds one image's latents"),
    (["decode", "{tmp}/notlatents.safetensors", "-o", "{tmp}/o"], "cannot read as a safetensors file"),
    (["decode", "{tmp}/wrongc.npy", "-o", "{tmp}/o"], "latents have 3 channels; the model"),
    (["encode", "{rgb}", "-o", "{tmp}/o", "--device", "cuda:7"], "--device cuda:7"),
    (["encode", "{rgb}", "-o", "{tmp}/o", "--tiling", "diagonal"], "--tiling diagonal: unknown mode"),
    (["encode", "{rgb}", "-o", "{tmp}/o", "--config", "sd1"], "--config applies to single-file models only"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, model_dir, images, capsys, argv, message):
    (tmp_path / "notlatents.safetensors").write_bytes(b"garbage")
    np.save(tmp_path / "wrongc.npy", np.zeros((3, 2, 2), np.float32))
    fill = dict(tmp=str(tmp_path), missing=str(tmp_path / "missing.png"), **images)
    argv = [a.format(**fill) for a in argv]
    if "-m" not in argv:
        argv += ["-m", model_dir]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("klvae: error: ") and message.format(**fill) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_default_model_missing_is_a_clear_error(monkeypatch, images, tmp_path, capsys):
    monkeypatch.setattr(klvae, "DEFAULT_MODEL", str(tmp_path / "not-exported"), raising=False)
    assert main(["encode", images["rgb"], "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "the bundled default model is not installed (nothing at" in err and "pass --model" in err
    monkeypatch.delattr(klvae, "DEFAULT_MODEL", raising=False)
    assert main(["info"]) == 2
    assert "the bundled default model is not installed; pass --model" in capsys.readouterr().err


def test_default_model_is_used_without_model(monkeypatch, model_dir, model, images, tmp_path):
    monkeypatch.setattr(klvae, "DEFAULT_MODEL", model_dir, raising=False)
    out = tmp_path / "d.safetensors"
    assert main(["encode", images["rgb"], "-o", str(out), "-q"]) == 0
    latents, meta = _read(str(out))
    assert meta["model"] == "default"
    torch.testing.assert_close(latents, _expected_mean(model, images["rgb"]), rtol=1e-5, atol=1e-6)


def test_single_file_model_and_tiling(tmp_path, model_dir, model, images):
    single = tmp_path / "vae.safetensors"
    model.save_single_file(str(single), prefix="first_stage_model.")
    assert main(["encode", images["rgb"], "-o", str(tmp_path / "a.safetensors"), "-m", str(single), "-q"]) == 0
    assert main(["encode", images["rgb"], "-o", str(tmp_path / "b.safetensors"), "-m", model_dir, "-q",
                 "--tiling"]) == 0
    expected = _expected_mean(model, images["rgb"])
    torch.testing.assert_close(_read(str(tmp_path / "a.safetensors"))[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_read(str(tmp_path / "b.safetensors"))[0], expected, rtol=1e-5, atol=1e-6)


def test_flax_backend_gives_the_same_latents(tmp_path, model_dir, model, images):
    pytest.importorskip("flax")
    out = tmp_path / "f.safetensors"
    assert main(["encode", images["rgb"], "-o", str(out), "-m", model_dir, "--backend", "flax", "--device", "cpu",
                 "-q"]) == 0
    latents, meta = _read(str(out))
    assert meta["backend"] == "flax"
    torch.testing.assert_close(latents, _expected_mean(model, images["rgb"]), rtol=1e-4, atol=1e-5)
    assert main(["decode", str(out), "-o", str(tmp_path / "d"), "-m", model_dir, "--backend", "flax", "-q"]) == 0
    assert Image.open(tmp_path / "d" / "f.png").size == (18, 13)


def test_flax_backend_with_exact_tiling(tmp_path, model_dir, model, images):
    """Exact tiling runs its own eager executor: the CLI must not wrap it in jax.jit."""
    pytest.importorskip("flax")
    big = str(tmp_path / "big.png")  # larger than the model's tile size, so tiling engages
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 72, 3), dtype=np.uint8)).save(big)
    out = tmp_path / "fx.safetensors"
    assert main(["encode", big, "-o", str(out), "-m", model_dir, "--backend", "flax", "--tiling", "exact",
                 "-q"]) == 0
    torch.testing.assert_close(_read(str(out))[0], _expected_mean(model, big), rtol=1e-4, atol=1e-5)
