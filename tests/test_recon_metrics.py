"""Colour and border metrics against direct numpy / per-pixel computations; the latent-scale rule against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from klvae.train.latent_scale import RunningMoments, posterior_mean_std, scaling_factor
from klvae.train.recon_metrics import (border_interior_psnr, channel_mean_error, chroma_error, colour_spread,
                                       colour_spread_ratio, reconstruction_metrics, worst_edge_psnr)


def _images(seed=0, h=48, w=40):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_colour_spread_is_the_mean_per_pixel_channel_std():
    a, b = _images()
    by_pixel = [np.std(a[i, j] / 255.0) for i in range(a.shape[0]) for j in range(a.shape[1])]
    assert colour_spread(a) == pytest.approx(np.mean(by_pixel), rel=1e-12)
    assert colour_spread_ratio(a, b) == pytest.approx(
        np.std(b / 255.0, axis=-1).mean() / np.std(a / 255.0, axis=-1).mean(), rel=1e-12)
    # A grey image has no spread at all; its ratio is undefined. Half the saturation halves the spread.
    grey = np.repeat(a[..., :1], 3, axis=-1)
    assert colour_spread(grey) == 0.0 and math.isnan(colour_spread_ratio(grey, b))
    washed = (a.astype(np.float64) + grey) / 2                                     # float input path
    assert colour_spread(washed) == pytest.approx(colour_spread(a) / 2, rel=1e-12)


def test_channel_mean_error_in_8bit_levels():
    a, b = _images(1)
    expected = [(b[..., c].astype(float) - a[..., c]).mean() for c in range(3)]
    assert channel_mean_error(a, b) == pytest.approx(expected, abs=1e-9)
    shifted = a.astype(int)
    shifted[..., 0] = np.minimum(shifted[..., 0] + 10, 255)
    assert channel_mean_error(a, shifted.astype(np.uint8))[1:] == (0.0, 0.0)


def test_border_and_interior_psnr_by_pixel_distance_to_the_edge():
    a, b = _images(2, 50, 70)
    band = 16
    sq = ((b.astype(float) - a) / 255.0) ** 2
    border, interior = [], []
    for i in range(50):
        for j in range(70):
            (border if min(i, j, 49 - i, 69 - j) < band else interior).append(sq[i, j])
    expected = [10 * math.log10(1 / np.mean(v)) for v in (border, interior)]
    assert border_interior_psnr(a, b, band) == pytest.approx(expected, rel=1e-12)
    # An error only on the top row: border PSNR drops, interior is perfect.
    c = a.copy()
    c[0] = 255 - c[0]
    got_border, got_interior = border_interior_psnr(a, c, band)
    row_sq = (((c[0].astype(float) - a[0]) / 255.0) ** 2).sum()
    n_border = 50 * 70 - (50 - 2 * band) * (70 - 2 * band)
    assert got_interior == math.inf
    assert got_border == pytest.approx(10 * math.log10(3 * n_border / row_sq), rel=1e-12)
    values = reconstruction_metrics(a, b)
    assert set(values) == {"colour", "chroma_err", "err_r", "err_g", "err_b", "psnr_border", "psnr_interior",
                           "psnr_edge_line"}
    # The worst 2-pixel edge strip: only the top one has errors in c.
    assert worst_edge_psnr(a, c) == pytest.approx(10 * math.log10(3 * 2 * 70 / row_sq), rel=1e-12)
    strips = [sq[:2], sq[-2:], sq[:, :2], sq[:, -2:]]
    assert values["psnr_edge_line"] == pytest.approx(min(10 * math.log10(1 / s.mean()) for s in strips), rel=1e-12)
    small = reconstruction_metrics(a[:20, :20], b[:20, :20])                   # no interior left: NaN
    assert math.isnan(small["psnr_border"]) and math.isnan(small["psnr_interior"])


def test_running_moments_match_numpy_std_of_everything_pooled():
    rng = np.random.default_rng(3)
    parts = [rng.normal(1e3, 2.0, size) for size in (1, 7, 1000, 33)]           # large offset: merge stability
    m = RunningMoments()
    for p in parts:
        m.add(p)
    pooled = np.concatenate(parts)
    assert m.count == pooled.size
    assert m.mean == pytest.approx(pooled.mean(), rel=1e-14)
    assert m.std == pytest.approx(pooled.std(), rel=1e-10)


def test_scaling_factor_is_one_over_the_pooled_std():
    # A linear "encoder" with a known output: 1 / std computed by hand.
    images = [np.full((8, 8, 3), v, np.uint8) for v in (0, 100, 200)]
    encode = lambda im: np.array([float(im[0, 0, 0]), 2.0 * im[0, 0, 0]])     # noqa: E731
    values = np.array([0, 0, 100, 200, 200, 400], float)
    assert scaling_factor(encode, images) == pytest.approx(1 / values.std(), rel=1e-12)
    with pytest.raises(ValueError, match="std 0.0"):
        scaling_factor(lambda im: np.ones(3), images)


def test_scaling_factor_of_a_tiny_model_against_numpy(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from klvae.torch.model import AutoencoderKL
    from klvae.train.data import to_model_input
    from klvae.train.latent_scale import model_scaling_factor, torch_encode_mean

    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                          latent_channels=4).eval()
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((16, 24), (34, 20), (8, 8))]
    means = []
    with torch.no_grad():
        for im in images:
            crop = im[:im.shape[0] // 2 * 2, :im.shape[1] // 2 * 2]                # factor 2 for two blocks
            top, left = (im.shape[0] - crop.shape[0]) // 2, (im.shape[1] - crop.shape[1]) // 2
            crop = im[top:top + crop.shape[0], left:left + crop.shape[1]]
            means.append(model.encode(torch.from_numpy(to_model_input(crop[None]))).latent_dist.mean.numpy().ravel())
    pooled = np.concatenate(means).astype(np.float64)
    std, mean, count = posterior_mean_std(torch_encode_mean(model), images)
    assert count == pooled.size and std == pytest.approx(pooled.std(), rel=1e-6)
    assert mean == pytest.approx(pooled.mean(), rel=1e-5, abs=1e-7)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    factor, n = model_scaling_factor(model, str(tmp_path))
    assert n == 3 and factor == pytest.approx(1 / pooled.std(), rel=1e-6)


def test_eval_cli_metrics_agree_with_the_trainer_and_numpy():
    torch = pytest.importorskip("torch")
    from klvae.torch.train.evaluation import evaluate, summarize
    from klvae.torch.model import AutoencoderKL
    from klvae.torch.train.trainer import evaluate_images
    from klvae.train.data import to_model_input, to_uint8

    torch.manual_seed(1)
    model = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1).eval()
    a, _ = _images(5, 40, 48)
    grey = np.repeat(a[..., :1], 3, axis=-1)
    values = evaluate(model, [a, grey])
    with torch.no_grad():
        reference = evaluate_images(model, [a, grey])
        rec = to_uint8(model(torch.from_numpy(to_model_input(a[None]))).sample.numpy())[0]
    assert values["psnr"] == pytest.approx(reference["psnr"], abs=1e-5)
    assert values["ssim"] == pytest.approx(reference["ssim"], abs=1e-6)
    expected = reconstruction_metrics(a, rec)
    assert {k: values[k][0] for k in expected} == pytest.approx(expected, rel=1e-9)
    assert math.isnan(values["colour"][1])
    summary = summarize(values)                                # the grey image's undefined ratio is left out
    assert summary["colour"]["n"] == 1 and summary["colour"]["mean"] == pytest.approx(expected["colour"])
    assert summary["psnr"]["n"] == 2


def test_recipe_export_writes_the_rule_s_scaling_factor(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from klvae.torch.model import AutoencoderKL
    from klvae.torch.train.checkpoint import model_from_checkpoint, resolve_checkpoint
    from klvae.torch.train.trainer import Trainer
    from klvae.train.config import load_train_config
    from klvae.train.data import to_model_input
    from klvae.train.default_model import export

    rng = np.random.default_rng(6)
    (tmp_path / "data").mkdir()
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((24, 32), (40, 16))]
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "data" / f"{i}.png")
    (tmp_path / "cfg.toml").write_text(
        '[model]\npreset = "tiny"\n[data]\ntrain_dir = "data"\ncrop_size = 16\nbatch_size = 2\n'
        '[optim]\nmax_steps = 1\n[train]\noutput_dir = "run"\nprogress = false\nema_decay = 0.9\n')
    config = load_train_config(str(tmp_path / "cfg.toml"))
    with Trainer(config) as trainer:
        trainer.fit()
    factor = export(config, str(tmp_path / "out"), log=lambda *_: None)
    # By hand: the checkpoint's EMA model in fp32, each image's posterior mean, numpy's std of them all.
    model = model_from_checkpoint(resolve_checkpoint(str(tmp_path / "run")), use_ema=True).float()
    with torch.no_grad():
        pooled = np.concatenate([model.encode(torch.from_numpy(to_model_input(im[None]))).latent_dist.mean
                                 .numpy().ravel() for im in images]).astype(np.float64)
    assert factor == pytest.approx(1 / pooled.std(), rel=1e-4) and factor == float(f"{factor:.5g}")  # 5 digits
    exported = AutoencoderKL.from_pretrained(str(tmp_path / "out"))
    assert exported.config.scaling_factor == factor
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}


def test_chroma_error_counts_hue_and_tint_but_not_brightness():
    original = np.zeros((2, 2, 3), np.uint8)
    original[0, 0] = (200, 100, 50)
    brighter = original.astype(np.int64) + 20                                  # same error in R, G and B
    assert chroma_error(original, brighter.astype(np.uint8)) == pytest.approx(0.0, abs=1e-9)
    recolored = original.copy()
    recolored[0, 0] = (100, 150, 50)                                           # error (-100, +50, 0) at one pixel
    d = np.array([-100.0, 50.0, 0.0])
    expected = math.sqrt(((d - d.mean()) ** 2).mean()) / 4                     # by hand: 62.36 / 4 pixels
    assert chroma_error(original, recolored) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(15.590, abs=1e-3)
    grey = np.full((2, 2, 3), 128, np.uint8)
    tinted = grey.copy()
    tinted[..., 0] += 12                                                       # a red tint on a grey image
    assert chroma_error(grey, tinted) == pytest.approx(math.sqrt(2 / 9) * 12, rel=1e-12)
