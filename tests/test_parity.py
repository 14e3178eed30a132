"""The PyTorch model against diffusers (the oracle): keys, shapes and every output, fp32, rel err <= 1e-5."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae
from klvae.config import AutoencoderKLConfig
from klvae.weights.layout import state_dict_shapes

TOL = 1e-5


def _images(cfg: AutoencoderKLConfig, batch: int, lat_hw: tuple[int, int], seed: int = 1) -> torch.Tensor:
    f = cfg.downsample_factor
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_channels, lat_hw[0] * f, lat_hw[1] * f, generator=g) * 2 - 1


def test_state_dict_keys_shapes_and_order_equal_diffusers(tiny_config_name):
    theirs, ours = diffusers_pair(TINY_CONFIGS[tiny_config_name])
    their_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert list(our_sd) == list(their_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in their_sd.items()}
    assert state_dict_shapes(ours.config) == {k: tuple(v.shape) for k, v in their_sd.items()}
    # Strict loading works in both directions.
    theirs.load_state_dict(our_sd, strict=True)
    assert ours.num_parameters() == theirs.num_parameters()


def test_sd_size_layout_matches_diffusers_on_meta_device():
    import diffusers

    for name in ("sd1", "sdxl", "flux"):
        cfg = klvae.preset(name)
        with torch.device("meta"):
            theirs = diffusers.AutoencoderKL(**cfg.to_dict())
            ours = klvae.AutoencoderKL(cfg)
        assert state_dict_shapes(cfg) == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.device("meta"):
        sd_model = klvae.AutoencoderKL(klvae.preset("sd1"))
    assert sd_model.num_parameters() == 83_653_863  # the published SD VAE parameter count


@pytest.mark.parametrize("lat_hw", [(5, 7), (6, 3)])
def test_outputs_equal_diffusers(tiny_config_name, lat_hw):
    theirs, ours = diffusers_pair(TINY_CONFIGS[tiny_config_name])
    x = _images(ours.config, batch=3, lat_hw=lat_hw)
    with torch.no_grad():
        pt, po = theirs.encode(x).latent_dist, ours.encode(x).latent_dist
        for name in ("parameters", "mean", "logvar", "std", "var"):
            assert rel_err(getattr(po, name), getattr(pt, name)) <= TOL, name
        assert rel_err(po.kl(), pt.kl()) <= TOL
        other_t, other_o = theirs.encode(x.flip(0)).latent_dist, ours.encode(x.flip(0)).latent_dist
        assert rel_err(po.kl(other_o), pt.kl(other_t)) <= TOL
        z = pt.mode()
        assert rel_err(po.nll(z), pt.nll(z)) <= TOL
        assert rel_err(po.nll(z, dims=[1, 2]), pt.nll(z, dims=[1, 2])) <= TOL
        assert rel_err(po.sample(torch.Generator().manual_seed(3)),
                       pt.sample(torch.Generator().manual_seed(3))) <= TOL
        assert rel_err(ours.decode(z).sample, theirs.decode(z).sample) <= TOL
        assert rel_err(ours(x).sample, theirs(x).sample) <= TOL
        gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
        gens2 = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
        assert rel_err(ours(x, sample_posterior=True, generator=gens).sample,
                       theirs(x, sample_posterior=True, generator=gens2).sample) <= TOL


def test_return_dict_false_gives_tuples():
    theirs, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    x = _images(ours.config, batch=2, lat_hw=(4, 4))
    with torch.no_grad():
        (posterior,) = ours.encode(x, return_dict=False)
        (sample,) = ours.decode(posterior.mode(), return_dict=False)
        (full,) = ours(x, return_dict=False)
        out = ours.decode(posterior.mode())
    assert isinstance(posterior, klvae.DiagonalGaussianDistribution)
    torch.testing.assert_close(sample, full, rtol=0, atol=0)
    torch.testing.assert_close(out[0], out.sample, rtol=0, atol=0)
    torch.testing.assert_close(out["sample"], sample, rtol=0, atol=0)
    assert rel_err(sample, theirs(x).sample) <= TOL


def test_deterministic_posterior():
    params = torch.randn(2, 8, 3, 3)
    d = klvae.DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(d.sample(), d.mean) and torch.equal(d.std, torch.zeros_like(d.mean))
    assert d.kl().item() == 0.0 and d.nll(d.mean).item() == 0.0


def test_posterior_against_float64_formulas():
    params = torch.randn(2, 8, 3, 4, dtype=torch.float64) * 3
    params[:, 4:, 0, 0] = 50.0  # above the clamp
    d = klvae.DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:].clamp(-30, 20)
    assert d.logvar.max().item() == 20.0
    torch.testing.assert_close(d.kl(), 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)))
    x = torch.randn_like(mean)
    expected = 0.5 * (torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)) + logvar
                      + (x - mean) ** 2 / logvar.exp()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(d.nll(x), expected)


def test_input_errors_name_the_shape():
    _, ours = diffusers_pair(TINY_CONFIGS["three_blocks_l2"])
    with pytest.raises(klvae.InputShapeError, match=r"multiples of 4.*\(1, 3, 10, 12\)|\(1, 3, 10, 12\).*multiples of 4"):
        ours.encode(torch.zeros(1, 3, 10, 12))
    with pytest.raises(klvae.InputShapeError, match=r"\(batch, 3, height, width\)"):
        ours.encode(torch.zeros(3, 16, 16))
    with pytest.raises(klvae.InputShapeError, match=r"\(batch, 4, height, width\); got \(1, 3, 4, 4\)"):
        ours.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        ours.decode(torch.zeros(1, 4, 4, 4, dtype=torch.int64))


def test_inputs_are_cast_to_the_model_dtype():
    theirs, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    ours.to(torch.bfloat16)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out = ours.decode(z).sample
    assert out.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_err(out, theirs.decode(z).sample) < 3e-2
