"""Canonical <-> Flax parameter conversion (klvae.weights.flax): table, strictness, dtypes, exact round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from conftest import TINY_CONFIGS
from klvae.config import AutoencoderKLConfig
from klvae.errors import StateDictMismatchError, WeightsError
from klvae.weights.flax import (canonical_to_flax, flatten_tree, flax_param_shapes, flax_param_table,
                                flax_to_canonical)
from klvae.weights.layout import state_dict_shapes

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def random_state_dict(config: AutoencoderKLConfig, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(dtype) for k, shape in state_dict_shapes(config).items()}


def test_table_names_and_layouts():
    config = AutoencoderKLConfig(**TINY_CONFIGS["two_blocks"])
    table = flax_param_table(config)
    assert table["encoder.conv_in.weight"].path == ("encoder", "conv_in", "kernel")
    assert table["encoder.conv_in.weight"].shape == (3, 3, 3, 8)  # HWIO from OIHW (8, 3, 3, 3)
    assert table["encoder.down_blocks.0.downsamplers.0.conv.bias"].path == (
        "encoder", "down_blocks_0", "downsamplers_0", "conv", "bias")
    assert table["decoder.up_blocks.0.upsamplers.0.conv.weight"].key == "decoder/up_blocks_0/upsamplers_0/conv/kernel"
    assert table["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (1, 1, 8, 16)
    attn = "decoder.mid_block.attentions.0"
    assert table[f"{attn}.to_q.weight"].path[-3:] == ("attentions_0", "query", "kernel")
    assert table[f"{attn}.to_out.0.bias"].path[-3:] == ("attentions_0", "proj_attn", "bias")
    assert table[f"{attn}.group_norm.weight"].path[-2:] == ("group_norm", "scale")
    assert table["quant_conv.weight"].shape == (1, 1, 8, 8)
    assert len(table) == len(state_dict_shapes(config))
    assert len({rule.path for rule in table.values()}) == len(table)  # one-to-one


def test_values_move_as_documented():
    config = AutoencoderKLConfig(**TINY_CONFIGS["two_blocks"])
    sd = random_state_dict(config)
    tree = canonical_to_flax(sd, config)
    conv = sd["encoder.conv_in.weight"]  # (O, I, H, W)
    assert tree["encoder"]["conv_in"]["kernel"][1, 2, 0, 5] == conv[5, 0, 1, 2]
    linear = sd["encoder.mid_block.attentions.0.to_v.weight"]  # (out, in)
    assert tree["encoder"]["mid_block"]["attentions_0"]["value"]["kernel"][3, 7] == linear[7, 3]
    np.testing.assert_array_equal(tree["decoder"]["conv_norm_out"]["scale"], sd["decoder.conv_norm_out.weight"])


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(name, dtype):
    config = AutoencoderKLConfig(**TINY_CONFIGS[name])
    sd = random_state_dict(config, dtype)
    back = flax_to_canonical(canonical_to_flax(sd, config), config)
    assert list(back) == list(sd)
    for key in sd:
        assert back[key].dtype == np.dtype(dtype)
        assert back[key].tobytes() == sd[key].tobytes(), key


def test_dtype_cast_on_the_way():
    config = AutoencoderKLConfig(**TINY_CONFIGS["sd3_like_16ch"])
    sd = random_state_dict(config, ml_dtypes.bfloat16)
    tree = canonical_to_flax(sd, config, dtype="float32")
    leaves = flatten_tree(tree)
    assert {v.dtype for v in leaves.values()} == {np.dtype(np.float32)}
    back = flax_to_canonical(tree, config, dtype="bf16")
    for key in sd:  # bf16 -> fp32 -> bf16 is exact
        assert back[key].tobytes() == sd[key].tobytes()
    with pytest.raises(ValueError, match="unknown dtype"):
        canonical_to_flax(sd, config, dtype="float8")


def test_torch_state_dict_round_trip_bit_exact():
    torch = pytest.importorskip("torch")
    from klvae.torch import AutoencoderKL

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = AutoencoderKL(**TINY_CONFIGS["three_blocks_l2"]).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        tree = canonical_to_flax(model.state_dict(), model.config)
        back = flax_to_canonical(tree, model.config)
        fresh = AutoencoderKL(**TINY_CONFIGS["three_blocks_l2"]).to(dtype)
        tensors = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == ml_dtypes.bfloat16
                   else torch.from_numpy(v) for k, v in back.items()}
        fresh.load_state_dict(tensors, strict=True)
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), (dtype, key)


def test_accepts_init_style_wrapper_and_legacy_attention_names():
    config = AutoencoderKLConfig(**TINY_CONFIGS["two_blocks"])
    sd = random_state_dict(config)
    legacy = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    tree = canonical_to_flax(legacy, config)
    back = flax_to_canonical({"params": tree}, config)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_canonical_side_errors_list_keys():
    config = AutoencoderKLConfig(**TINY_CONFIGS["two_blocks"])
    sd = random_state_dict(config)
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = np.zeros((2, 2), np.float32)
    sd["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    with pytest.raises(StateDictMismatchError) as info:
        canonical_to_flax(sd, config, source="my.safetensors")
    err = info.value
    assert err.missing == ["decoder.conv_out.bias"]
    assert err.unexpected == ["decoder.extra.weight"]
    assert err.mismatched == {"encoder.conv_in.weight": ((8, 3, 3, 3), (8, 3, 5, 5))}
    assert "my.safetensors" in str(err) and "decoder.extra.weight" in str(err)


def test_flax_side_errors_list_paths():
    config = AutoencoderKLConfig(**TINY_CONFIGS["sd3_like_16ch"])
    tree = canonical_to_flax(random_state_dict(config), config)
    del tree["decoder"]["conv_in"]["bias"]
    tree["quant_conv"] = {"kernel": np.zeros((1, 1, 32, 32), np.float32), "bias": np.zeros(32, np.float32)}
    tree["encoder"]["conv_out"]["kernel"] = tree["encoder"]["conv_out"]["kernel"][..., :8]
    with pytest.raises(StateDictMismatchError) as info:
        flax_to_canonical(tree, config)
    err = info.value
    assert err.missing == ["decoder/conv_in/bias"]
    assert sorted(err.unexpected) == ["quant_conv/bias", "quant_conv/kernel"]  # this config has no quant convs
    assert err.mismatched == {"encoder/conv_out/kernel": ((3, 3, 16, 32), (3, 3, 16, 8))}


def test_rejects_non_float_and_non_tree():
    config = AutoencoderKLConfig(**TINY_CONFIGS["two_blocks"])
    sd = random_state_dict(config)
    sd["encoder.conv_in.bias"] = np.zeros(8, np.int32)
    with pytest.raises(WeightsError, match="encoder.conv_in.bias.*int32"):
        canonical_to_flax(sd, config)
    with pytest.raises(WeightsError, match="mapping"):
        flax_to_canonical([1, 2], config)


def test_shapes_table_matches_flax_init():
    """The conversion table and the linen module agree on every path and shape (shape-only init)."""
    jax = pytest.importorskip("jax")
    from klvae.flax import FlaxAutoencoderKL

    for name, fields in TINY_CONFIGS.items():
        model = FlaxAutoencoderKL(**fields)
        shapes = model.init_weights(jax.random.key(0), eval_only=True)
        assert {p: tuple(v.shape) for p, v in flatten_tree(shapes).items()} == flax_param_shapes(model.config), name


def test_layers_below_flax_import_neither_torch_nor_jax():
    code = ("import sys, klvae, klvae.config, klvae.weights.flax, klvae.weights.layout, klvae.tiling\n"
            "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))")
    assert _run(code) == "[]"


def test_flax_backend_imports_without_torch():
    code = ("import sys\nfrom klvae.flax import FlaxAutoencoderKL\n"
            "print(json.dumps(['torch' in sys.modules, 'jax' in sys.modules]))")
    assert json.loads(_run("import json\n" + code)) == [False, True]


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
