"""The Flax phase-convolution upsampler against nearest upsampling and a 3x3 conv: in float64 (to rounding), in
float32 and bf16 compute through the module, and with the parameter tree the weight conversion expects."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import rel_err  # noqa: E402
from klvae.flax.blocks import FlaxUpsample2D, upsample_conv, upsample_nearest_2x  # noqa: E402


def _plain(x, kernel, bias):
    y = jax.lax.conv_general_dilated(upsample_nearest_2x(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    return y + bias


@pytest.mark.parametrize("shape", [(2, 7, 9, 5), (1, 1, 1, 3), (1, 2, 6, 4)])
def test_upsample_conv_equals_upsample_then_conv(shape):
    rng = np.random.default_rng(0)
    x, k, b = rng.standard_normal(shape), rng.standard_normal((3, 3, shape[-1], 6)), rng.standard_normal(6)
    with jax.enable_x64(True):
        expected = _plain(jnp.asarray(x), jnp.asarray(k), jnp.asarray(b))
        got64 = upsample_conv(jnp.asarray(x), jnp.asarray(k), jnp.asarray(b), precision="highest")
        assert got64.dtype == jnp.float64 and rel_err(got64, expected) <= 1e-13
        expected = np.asarray(expected)
    got = upsample_conv(*(jnp.asarray(a, jnp.float32) for a in (x, k, b)), precision="highest")
    assert got.shape == expected.shape and got.dtype == jnp.float32
    assert rel_err(got, expected) <= 1e-6


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_module_matches_the_plain_path_and_keeps_its_parameters(dtype, tol):
    module = FlaxUpsample2D(5, dtype=dtype, precision="highest")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 3, 5)), jnp.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == \
        {"params": {"conv": {"bias": (5,), "kernel": (3, 3, 5, 5)}}}
    got = jax.jit(module.apply)(variables, x)
    plain = module.apply(variables, x, method=lambda m, v: m.conv(upsample_nearest_2x(v)))
    params = variables["params"]["conv"]
    expected = _plain(x, params["kernel"], params["bias"])
    assert got.dtype == plain.dtype == dtype and got.shape == (2, 8, 6, 5)
    assert rel_err(got, expected) <= tol and rel_err(plain, expected) <= tol
