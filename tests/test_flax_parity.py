"""The Flax model against the PyTorch model (the oracle, itself bit-exact with diffusers) on the same weights."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import TINY_CONFIGS, perturb_, rel_err  # noqa: E402
from klvae.flax import FlaxAutoencoderKL  # noqa: E402
from klvae.torch import AutoencoderKL  # noqa: E402
from klvae.weights.flax import canonical_to_flax  # noqa: E402

FP32_TOL = 1e-4   # the bound for fp32 at precision "highest" (measured: ~1e-6)
# XLA's LLVM optimisation level 0 halves compile time on the 2-core CI machine; the HLO (and so the maths) is the
# same, only the generated machine code is less tuned.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_pair(name: str, seed: int = 0, **flax_fields):
    """A perturbed torch model, the Flax module for its config, and the converted params."""
    torch.manual_seed(seed)  # the default init is random too
    torch_model = AutoencoderKL(**TINY_CONFIGS[name])
    perturb_(torch_model, seed=seed)
    torch_model.eval()
    flax_model = FlaxAutoencoderKL.from_config(torch_model.config, **flax_fields)
    params = canonical_to_flax(torch_model.state_dict(), torch_model.config)
    return torch_model, flax_model, params


def images(config, batch: int, h_latent: int, w_latent: int, seed: int = 1) -> torch.Tensor:
    f = config.downsample_factor
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.in_channels, h_latent * f, w_latent * f, generator=g) * 2 - 1


def encode_decode_call(model):
    """One jitted program (one compile) giving the posterior of x, the decoding of z and the full call on x."""

    def run(params, x, z):
        variables = {"params": params}
        posterior = model.apply(variables, x, method="encode").latent_dist
        return posterior, model.apply(variables, z, method="decode").sample, model.apply(variables, x).sample

    return jax.jit(run, compiler_options=FAST_COMPILE)


# Latent sizes are odd and non-square; batch 2 everywhere.
@pytest.mark.parametrize("name", ["two_blocks", "sd3_like_16ch", "three_blocks_l2", "no_mid_attention_mish",
                                  "gray_one_block_relu"])
def test_fp32_encode_decode_match_torch(name):
    torch_model, model, params = make_pair(name, precision="highest")
    x = images(torch_model.config, 2, 7, 5)
    with torch.no_grad():
        posterior = torch_model.encode(x).latent_dist
        decoded = torch_model.decode(posterior.mode()).sample
        full = torch_model(x).sample
    # Decode the torch mode itself, so the decoder is compared on identical inputs.
    flax_posterior, flax_decoded, flax_full = encode_decode_call(model)(
        params, jnp.asarray(x.numpy()), jnp.asarray(posterior.mode().numpy()))
    assert flax_posterior.mean.shape == tuple(posterior.mean.shape)  # NCHW
    assert rel_err(flax_posterior.mean, posterior.mean) <= FP32_TOL
    assert rel_err(flax_posterior.logvar, posterior.logvar) <= FP32_TOL
    assert rel_err(flax_posterior.std, posterior.std) <= FP32_TOL
    assert flax_decoded.shape == tuple(decoded.shape)
    assert rel_err(flax_decoded, decoded) <= FP32_TOL
    assert rel_err(flax_full, full) <= FP32_TOL
