"""Flax numerics against the PyTorch model: bf16 compute and parameters, and the posterior's statistics."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import rel_err  # noqa: E402
from klvae.flax import FlaxAutoencoderKL  # noqa: E402
from klvae.weights.flax import canonical_to_flax  # noqa: E402
from test_flax_parity import FAST_COMPILE, FP32_TOL, images, make_pair  # noqa: E402

BF16_TOL = 3e-2   # the bound for bf16 compute against the fp32 torch model


def _call(model):
    return jax.jit(lambda p, s: model.apply({"params": p}, s).sample, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("name", ["two_blocks", "sd3_like_16ch"])
def test_bf16_compute_close_to_torch_fp32(name):
    torch_model, model, params = make_pair(name, dtype=jnp.bfloat16)
    x = images(torch_model.config, 2, 5, 7)
    with torch.no_grad():
        expected = torch_model(x).sample
        torch_bf16 = copy.deepcopy(torch_model).to(torch.bfloat16)
        torch_bf16.compute_dtype = torch.bfloat16  # bf16 arithmetic, even where the CPU would compute in float32
        torch_bf16 = torch_bf16(x.bfloat16()).sample
    out = _call(model)(params, jnp.asarray(x.numpy()))
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out)))
    err = rel_err(np.asarray(out.astype(jnp.float32)), expected)
    assert err <= BF16_TOL, err
    assert err > 1e-4  # bf16 really was used (fp32 agrees to ~1e-6)
    # No worse than bf16 itself costs: the torch model run in bf16 is off by a similar amount.
    assert err <= 2 * rel_err(torch_bf16, expected)


def test_bf16_params_and_compute():
    torch_model, _, _ = make_pair("two_blocks")
    model = FlaxAutoencoderKL.from_config(torch_model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = canonical_to_flax(torch_model.state_dict(), torch_model.config, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    x = images(torch_model.config, 2, 5, 3)
    with torch.no_grad():
        expected = torch_model(x).sample
    out = _call(model)(params, jnp.asarray(x.numpy()))
    assert bool(jnp.all(jnp.isfinite(out)))
    assert rel_err(np.asarray(out.astype(jnp.float32)), expected) <= BF16_TOL


def test_posterior_statistics_match_torch():
    torch_model, model, params = make_pair("sd3_like_16ch", precision="highest")
    x = images(torch_model.config, 2, 3, 5)
    with torch.no_grad():
        post = torch_model.encode(x).latent_dist
        other = torch_model.encode(x.flip(0)).latent_dist
        target = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        expected = (post.kl(), post.kl(other), post.nll(target), post.nll(target, dims=(1, 2)), post.var)

    encode = jax.jit(lambda p, s: model.apply({"params": p}, s, method="encode").latent_dist,
                     compiler_options=FAST_COMPILE)
    both = encode(params, jnp.asarray(torch.cat([x, x.flip(0)]).numpy()))
    fpost = both.replace(parameters=both.parameters[:2])
    fother = both.replace(parameters=both.parameters[2:])
    t = jnp.asarray(target.numpy())
    got = (fpost.kl(), fpost.kl(fother), fpost.nll(t), fpost.nll(t, axis=(1, 2)), fpost.var)
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        assert rel_err(g, e) <= FP32_TOL


def test_logvar_is_clamped_and_deterministic_posterior_is_degenerate():
    from klvae.flax import FlaxDiagonalGaussianDistribution

    params = jnp.concatenate([jnp.ones((1, 2, 3, 3)), jnp.full((1, 2, 3, 3), 50.0)], axis=1)
    dist = FlaxDiagonalGaussianDistribution(params)
    assert float(dist.logvar.max()) == 20.0
    assert float(dist.std.max()) == pytest.approx(np.exp(10.0), rel=1e-6)
    low = FlaxDiagonalGaussianDistribution(params.at[:, 2:].set(-100.0))
    assert float(low.logvar.min()) == -30.0
    fixed = FlaxDiagonalGaussianDistribution(params, deterministic=True)
    key = jax.random.key(0)
    assert np.array_equal(fixed.sample(key), fixed.mean)
    assert fixed.kl().shape == (1,) and float(fixed.kl()[0]) == 0.0
    assert float(fixed.nll(params[:, :2])[0]) == 0.0
    # The sample is mean + std * N(0, 1) drawn from exactly this key.
    noise = jax.random.normal(key, dist.mean.shape, dist.mean.dtype)
    assert np.allclose(dist.sample(key), dist.mean + dist.std * noise)
