"""The Flax module's API: fields and config, init_weights, the "gaussian" rng stream, inputs and errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import TINY_CONFIGS  # noqa: E402
from klvae.config import AutoencoderKLConfig, preset  # noqa: E402
from klvae.errors import ConfigError, InputShapeError  # noqa: E402
from klvae.flax import FlaxAutoencoderKL  # noqa: E402
from klvae.weights.flax import flatten_tree, flax_param_shapes  # noqa: E402
from test_flax_parity import FAST_COMPILE  # noqa: E402


def test_fields_mirror_the_shared_config():
    config_fields = [f.name for f in dataclasses.fields(AutoencoderKLConfig)]
    module_fields = [f.name for f in dataclasses.fields(FlaxAutoencoderKL)]
    assert module_fields[:len(config_fields)] == config_fields
    assert {"dtype", "param_dtype", "precision"} <= set(module_fields)
    for f in dataclasses.fields(AutoencoderKLConfig):  # same defaults as the config (diffusers')
        assert getattr(FlaxAutoencoderKL(), f.name) == getattr(AutoencoderKLConfig(), f.name), f.name


def test_from_config_and_config_round_trip():
    model = FlaxAutoencoderKL.from_config(preset("flux"), dtype=jnp.bfloat16)
    assert model.config == preset("flux") and model.dtype == jnp.bfloat16
    assert model.config.shift_factor == 0.1159  # fields diffusers-flax dropped are kept
    lists = FlaxAutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                              up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)
    assert lists.block_out_channels == (8, 16)
    hash(lists)  # hashable, so usable as a static argument
    from_dict = FlaxAutoencoderKL.from_config(preset("tiny").to_diffusers_dict())
    assert from_dict.config == preset("tiny")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        FlaxAutoencoderKL(block_out_channels=(8, 12), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)


def test_init_weights_real_and_shape_only_agree():
    model = FlaxAutoencoderKL(**TINY_CONFIGS["three_blocks_l2"], param_dtype=jnp.bfloat16)
    shapes = model.init_weights(jax.random.key(0), eval_only=True)
    params = model.init_weights(jax.random.key(0))
    flat_shapes, flat_params = flatten_tree(shapes), flatten_tree(params)
    assert set(flat_shapes) == set(flat_params) == set(flax_param_shapes(model.config))
    for path, spec in flat_shapes.items():
        assert isinstance(spec, jax.ShapeDtypeStruct)
        assert spec.shape == flat_params[path].shape and spec.dtype == flat_params[path].dtype == jnp.bfloat16
    again = model.init_weights(jax.random.key(0))
    other = model.init_weights(jax.random.key(1))
    kernel = ("encoder", "conv_in", "kernel")
    assert np.array_equal(flatten_tree(again)[kernel], flat_params[kernel])
    assert not np.array_equal(flatten_tree(other)[kernel], flat_params[kernel])


@pytest.fixture(scope="module")
def tiny():
    model = FlaxAutoencoderKL(**TINY_CONFIGS["sd3_like_16ch"])
    params = model.init_weights(jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # off the zero biases
    return model, params


def test_sample_posterior_draws_from_the_gaussian_stream(tiny):
    model, params = tiny
    x = jax.random.uniform(jax.random.key(3), (2, 3, 6, 6), minval=-1, maxval=1)

    def first_gaussian_key(module, x):
        """The posterior and the key a first make_rng("gaussian") gets, as __call__'s own draw does."""
        return module.encode(x).latent_dist, module.make_rng("gaussian")

    @jax.jit(compiler_options=FAST_COMPILE)
    def run(p, x, key_a, key_b):
        v = {"params": p}
        sampled_a = model.apply(v, x, sample_posterior=True, rngs={"gaussian": key_a}).sample
        sampled_b = model.apply(v, x, sample_posterior=True, rngs={"gaussian": key_b}).sample
        posterior, key = model.apply(v, x, method=first_gaussian_key, rngs={"gaussian": key_a})
        z = posterior.mean + posterior.std * jax.random.normal(key, posterior.mean.shape)
        by_hand = model.apply(v, z, method="decode").sample
        return sampled_a, sampled_b, model.apply(v, x).sample, by_hand

    a, b, mode, by_hand = run(params, x, jax.random.key(7), jax.random.key(8))
    assert np.allclose(a, by_hand, rtol=0, atol=1e-6)  # decode(mean + std * N(0, 1) from the "gaussian" key)
    assert not np.allclose(a, b) and not np.allclose(a, mode)
    with pytest.raises(Exception, match="gaussian"):
        model.apply({"params": params}, x, sample_posterior=True)


def test_input_checks(tiny):
    model, params = tiny
    variables = {"params": params}
    with pytest.raises(InputShapeError, match=r"\(batch, 3, height, width\)"):
        model.apply(variables, jnp.zeros((1, 6, 6, 3)), method="encode")  # NHWC is refused, not guessed
    with pytest.raises(InputShapeError, match="multiples of 2"):
        model.apply(variables, jnp.zeros((1, 3, 7, 6)), method="encode")
    with pytest.raises(InputShapeError, match=r"\(batch, 16, height, width\)"):
        model.apply(variables, jnp.zeros((1, 4, 16, 16)), method="decode")
    with pytest.raises(TypeError, match="floating-point"):
        model.apply(variables, jnp.zeros((1, 3, 6, 6), jnp.int32), method="encode")
    with pytest.raises(TypeError, match="must be an array"):
        model.apply(variables, [[0.0]], method="decode")
