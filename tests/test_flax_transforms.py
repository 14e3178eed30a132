"""JAX transforms through the Flax model: grad (checked against torch autograd), vmap, and jit reuse."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import rel_err  # noqa: E402
from klvae.weights.flax import flax_to_canonical  # noqa: E402
from test_flax_parity import FAST_COMPILE, FP32_TOL, make_pair  # noqa: E402


def test_gradients_match_torch_autograd():
    """d/dz and d/dparams of sum(decode(z)^2) agree with torch autograd (grads mapped back to canonical keys)."""
    torch_model, model, params = make_pair("two_blocks", precision="highest")
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    torch_model.zero_grad()
    (torch_model.decode(z).sample ** 2).sum().backward()

    def loss(p, latents):
        return jnp.sum(model.apply({"params": p}, latents, method="decode").sample ** 2)

    grad_params, grad_z = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)(
        params, jnp.asarray(z.detach().numpy()))
    assert rel_err(grad_z, z.grad) <= FP32_TOL
    grads = flax_to_canonical(grad_params, torch_model.config)
    named = dict(torch_model.named_parameters())
    # Adding a constant to every key leaves each softmax row unchanged, so to_k.bias has a zero gradient
    # analytically; both frameworks return rounding noise there.
    zero_grad_key = "decoder.mid_block.attentions.0.to_k.bias"
    scale = max(float(np.abs(g).max()) for g in grads.values())
    assert float(np.abs(grads[zero_grad_key]).max()) <= 1e-5 * scale
    for key in grads:
        if key.startswith(("decoder.", "post_quant_conv.")) and key != zero_grad_key:
            assert rel_err(grads[key], named[key].grad) <= 1e-3, key
        elif key.startswith(("encoder.", "quant_conv.")):
            assert not np.any(grads[key]), key  # decode does not touch the encoder


def test_vmap_over_stacked_params_and_inputs():
    torch_a, model, params_a = make_pair("two_blocks", seed=0)
    torch_b, _, params_b = make_pair("two_blocks", seed=5)
    z = jax.random.normal(jax.random.key(0), (2, 4, 3, 3))

    def decode(p, latents):
        return model.apply({"params": p}, latents, method="decode").sample

    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params_a, params_b)
    zs = jnp.stack([z, 2 * z])

    @jax.jit(compiler_options=FAST_COMPILE)
    def run(stacked, params_a, z, zs):
        over_params = jax.vmap(decode, in_axes=(0, None))(stacked, z)
        over_inputs = jax.vmap(decode, in_axes=(None, 0))(params_a, zs)
        return over_params, over_inputs, decode(params_a, z), decode(params_a, 2 * z)

    over_params, over_inputs, one_a, one_a2 = run(stacked, params_a, z, zs)
    assert over_params.shape == (2, 2, 3, 6, 6) and over_inputs.shape == (2, 2, 3, 6, 6)
    assert rel_err(over_params[0], one_a) <= 1e-5
    assert rel_err(over_params[1], one_a) > 1e-2  # the second parameter set really differs
    assert rel_err(over_inputs[1], one_a2) <= 1e-5
    z_torch = torch.from_numpy(np.array(z))
    with torch.no_grad():
        assert rel_err(one_a, torch_a.decode(z_torch).sample) <= FP32_TOL
        assert rel_err(over_params[1], torch_b.decode(z_torch).sample) <= FP32_TOL


def test_jit_compiles_once_per_shape():
    _, model, params = make_pair("two_blocks")
    traces: list[tuple[int, ...]] = []

    def decode(p, latents):
        traces.append(latents.shape)  # runs only while tracing
        return model.apply({"params": p}, latents, method="decode")

    fast = jax.jit(decode, compiler_options=FAST_COMPILE)
    z = jax.random.normal(jax.random.key(1), (2, 4, 3, 5))
    first = fast(params, z)
    second = fast(params, z + 1.0)
    third = fast(params, z * 0.5)
    assert traces == [(2, 4, 3, 5)]
    assert fast._cache_size() == 1
    assert not np.allclose(first.sample, second.sample)
    assert third.sample.shape == (2, 3, 6, 10)
    fast(params, jnp.zeros((1, 4, 3, 5)))  # a new shape traces again, once
    fast(params, jnp.ones((1, 4, 3, 5)))
    assert traces == [(2, 4, 3, 5), (1, 4, 3, 5)]
    assert fast._cache_size() == 2


def test_outputs_are_pytrees_through_jit():
    from klvae.flax import FlaxAutoencoderKLOutput, FlaxDecoderOutput, FlaxDiagonalGaussianDistribution

    _, model, params = make_pair("sd3_like_16ch")
    x = jax.random.uniform(jax.random.key(2), (2, 3, 6, 4), minval=-1, maxval=1)

    @jax.jit(compiler_options=FAST_COMPILE)
    def encode_decode(p, x):
        out = model.apply({"params": p}, x, method="encode")
        dec = model.apply({"params": p}, out.latent_dist.mode(), method="decode")
        # return_dict=False gives plain tuples
        (posterior,) = model.apply({"params": p}, x, method="encode", return_dict=False)
        (sample,) = model.apply({"params": p}, posterior.mode(), method="decode", return_dict=False)
        return out, dec, sample

    enc, dec, sample = encode_decode(params, x)
    assert isinstance(enc, FlaxAutoencoderKLOutput) and isinstance(dec, FlaxDecoderOutput)
    assert isinstance(enc.latent_dist, FlaxDiagonalGaussianDistribution)
    assert enc.latent_dist.mean.shape == (2, 16, 3, 2)  # NCHW, unlike diffusers-flax's NHWC posterior
    assert len(jax.tree_util.tree_leaves(enc)) == 1  # the moments are the only leaf
    doubled = dec.replace(sample=dec.sample * 2)
    assert np.allclose(doubled.sample, 2 * dec.sample) and doubled[0] is doubled.sample
    assert dec["sample"] is dec.sample
    assert rel_err(sample, dec.sample) <= 1e-6
