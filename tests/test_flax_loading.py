"""FlaxAutoencoderKL.from_pretrained / save_pretrained with the canonical diffusers folder, across backends."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import TINY_CONFIGS, perturb_, rel_err  # noqa: E402
from klvae.errors import StateDictMismatchError, WeightsError  # noqa: E402
from klvae.flax import FlaxAutoencoderKL  # noqa: E402
from klvae.torch import AutoencoderKL  # noqa: E402
from klvae.weights.flax import canonical_to_flax, flatten_tree, flax_to_canonical  # noqa: E402
from test_flax_parity import FAST_COMPILE, FP32_TOL  # noqa: E402


def torch_model(name: str = "two_blocks", seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_CONFIGS[name])
    perturb_(model, seed=seed)
    return model.eval()


def assert_params_equal_state_dict(params, model: AutoencoderKL) -> None:
    """Every Flax param equals the torch tensor it came from, bit for bit (after the layout transpose)."""
    back = flax_to_canonical(params, model.config)
    for key, value in model.state_dict().items():
        expected = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
        got = back[key].astype(np.float32) if back[key].dtype == ml_dtypes.bfloat16 else back[key]
        assert got.dtype == expected.dtype and np.array_equal(got, expected), key


def test_loads_torch_folder_with_subfolder(tmp_path):
    model = torch_model("sd3_like_16ch")
    model.save_pretrained(tmp_path / "vae")
    flax_model, params = FlaxAutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    assert flax_model.config == model.config
    assert flax_model.latent_channels == 16 and not flax_model.use_quant_conv
    assert_params_equal_state_dict(params, model)
    assert all(isinstance(v, jax.Array) for v in flatten_tree(params).values())


@pytest.mark.parametrize("source_dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_widen_exactly(tmp_path, source_dtype):
    model = torch_model().to(getattr(torch, source_dtype))
    model.save_pretrained(tmp_path, variant="fp16")
    flax_model, params = FlaxAutoencoderKL.from_pretrained(tmp_path, variant="fp16", dtype=jnp.bfloat16)
    assert flax_model.dtype == jnp.bfloat16 and flax_model.param_dtype == jnp.float32
    leaves = flatten_tree(params)
    assert {v.dtype for v in leaves.values()} == {jnp.dtype(jnp.float32)}
    # float32 holds every fp16/bf16 value exactly: converting back gives the file's values
    back = flax_to_canonical(params, model.config, dtype=source_dtype)
    for key, value in model.state_dict().items():
        assert torch.equal(torch.from_numpy(back[key].astype(np.float32)), value.float()), key
    _, kept = FlaxAutoencoderKL.from_pretrained(tmp_path, variant="fp16", param_dtype=jnp.bfloat16)
    assert {v.dtype for v in flatten_tree(kept).values()} == {jnp.dtype(jnp.bfloat16)}


def test_flax_save_loads_in_klvae_torch_and_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    source = torch_model("two_blocks", seed=3)
    source.save_pretrained(tmp_path / "src")
    flax_model, params = FlaxAutoencoderKL.from_pretrained(tmp_path / "src", precision="highest")
    flax_model.save_pretrained(tmp_path / "out", params)

    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["_class_name"] == "AutoencoderKL"
    ours = AutoencoderKL.from_pretrained(tmp_path / "out")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    for key, value in source.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
        assert torch.equal(theirs.state_dict()[key], value), key

    z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    decode = jax.jit(lambda p, z: flax_model.apply({"params": p}, z, method="decode").sample,
                     compiler_options=FAST_COMPILE)
    with torch.no_grad():
        expected = theirs.decode(z).sample
    assert rel_err(decode(params, jnp.asarray(z.numpy())), expected) <= FP32_TOL


def test_save_with_dtype_and_variant(tmp_path):
    model = torch_model()
    flax_model = FlaxAutoencoderKL.from_config(model.config)
    params = jax.tree_util.tree_map(jnp.asarray, canonical_to_flax(model.state_dict(), model.config))
    flax_model.save_pretrained(tmp_path, params, variant="bf16", dtype=jnp.bfloat16)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.bf16.safetensors")
    loaded = AutoencoderKL.from_pretrained(tmp_path, variant="bf16", torch_dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.bfloat16()), key
    flax_model.save_pretrained(tmp_path / "skip", params, is_main_process=False)
    assert not os.path.exists(tmp_path / "skip")


def test_strict_loading_errors(tmp_path):
    model = torch_model()
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["latent_channels"] = 8  # the weights no longer fit the config
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(StateDictMismatchError) as info:
        FlaxAutoencoderKL.from_pretrained(tmp_path)
    assert "decoder.conv_in.weight" in info.value.mismatched
    assert str(tmp_path) in str(info.value)
    with pytest.raises(WeightsError, match="no such folder"):
        FlaxAutoencoderKL.from_pretrained(tmp_path / "nowhere" / "x")
    with pytest.raises(WeightsError, match="from_pt=True"):
        FlaxAutoencoderKL.from_pretrained(tmp_path, from_pt=False)
    with pytest.raises(StateDictMismatchError):
        FlaxAutoencoderKL.from_config(model.config).save_pretrained(tmp_path / "bad", {"encoder": {}})
    assert not os.path.exists(tmp_path / "bad")


def test_reads_legacy_bin_and_sharded_folders(tmp_path):
    model = torch_model()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    _, params = FlaxAutoencoderKL.from_pretrained(tmp_path / "bin")
    assert_params_equal_state_dict(params, model)

    from safetensors.torch import save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    model.config.to_json_file(sharded / "config.json")
    state = model.state_dict()
    keys = list(state)
    parts = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for name, part in parts.items():
        save_file({k: state[k].contiguous() for k in part}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in parts.items() for k in part}}
    with open(sharded / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    _, params = FlaxAutoencoderKL.from_pretrained(sharded)
    assert_params_equal_state_dict(params, model)
