"""FlaxAutoencoderKL.from_single_file / save_single_file: same files, same reader, torch as the oracle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_single_file import (FLUX_LIKE, SD_LIKE, fake_full_checkpoint, random_diffusers,  # noqa: E402
                              to_ldm)

from klvae.flax import FlaxAutoencoderKL  # noqa: E402

FP32_TOL = 1e-4  # Flax vs torch in fp32 at precision "highest", as in the Flax parity tests


def compare_with_torch(model, params, ref):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        decoded = ref.decode(posterior.mean).sample
    encode = jax.jit(lambda p, s: model.apply({"params": p}, s, method="encode"))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    ours = encode(params, jnp.asarray(x.numpy())).latent_dist
    assert rel_err(ours.mean, posterior.mean) <= FP32_TOL
    assert rel_err(ours.logvar, posterior.logvar) <= FP32_TOL
    out = decode(params, jnp.asarray(posterior.mean.numpy())).sample
    assert rel_err(out, decoded) <= FP32_TOL


def test_flux_style_bare_file(tmp_path):
    ref = random_diffusers(FLUX_LIKE, seed=31)
    folder = str(tmp_path / "config")
    ref.save_pretrained(folder)
    path = str(tmp_path / "ae.safetensors")
    save_file(to_ldm(ref.state_dict(), FLUX_LIKE), path)
    model, params = FlaxAutoencoderKL.from_single_file(path, config=folder, precision="highest")
    assert model.config.latent_channels == 16 and not model.config.use_quant_conv
    assert params["encoder"]["conv_in"]["kernel"].dtype == jnp.float32
    compare_with_torch(model, params, ref)


def test_sd_style_ckpt_inferred_and_exported_bit_exact(tmp_path):
    ref = random_diffusers(SD_LIKE, seed=32)
    ckpt = {"state_dict": {**fake_full_checkpoint("sd1"), **to_ldm(ref.state_dict(), SD_LIKE, "first_stage_model.")}}
    path = str(tmp_path / "sd.ckpt")
    torch.save(ckpt, path)
    model, params = FlaxAutoencoderKL.from_single_file(path, precision="highest")
    assert model.config.block_out_channels == (32, 64) and model.config.scaling_factor == 0.18215
    compare_with_torch(model, params, ref)
    out = str(tmp_path / "export.safetensors")
    model.save_single_file(params, out)
    exported, expected = load_file(out), to_ldm(ref.state_dict(), SD_LIKE)
    assert set(exported) == set(expected)
    for key in expected:
        assert torch.equal(exported[key], expected[key]), key


def test_bf16_params_kept_exactly(tmp_path):
    ref = random_diffusers(FLUX_LIKE, seed=33)
    tensors = {k: v.to(torch.bfloat16) for k, v in to_ldm(ref.state_dict(), FLUX_LIKE).items()}
    path = str(tmp_path / "ae_bf16.safetensors")
    save_file(tensors, path)
    model, params = FlaxAutoencoderKL.from_single_file(path, config=dict(FLUX_LIKE), param_dtype=jnp.bfloat16)
    kernel = params["decoder"]["conv_in"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = tensors["decoder.conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(kernel, dtype=np.float32), want)


def test_safetensors_path_needs_no_torch(tmp_path):
    """In a process where torch cannot be imported, a safetensors single file still loads into Flax."""
    ref = random_diffusers(FLUX_LIKE, seed=34)
    path = str(tmp_path / "ae.safetensors")
    save_file(to_ldm(ref.state_dict(), FLUX_LIKE), path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from klvae.flax import FlaxAutoencoderKL\n"
            f"m, p = FlaxAutoencoderKL.from_single_file({path!r}, config={dict(FLUX_LIKE)!r})\n"
            "print(m.config.latent_channels, p['encoder']['conv_in']['kernel'].shape)\n"
            f"try:\n    FlaxAutoencoderKL.from_single_file({str(tmp_path / 'x.ckpt')!r})\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    with open(tmp_path / "x.ckpt", "wb") as f:
        f.write(b"PK\x03\x04 not really")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "16 (3, 3, 3, 32)"
    assert lines[1].startswith("WeightsError") and "needs torch" in lines[1]
