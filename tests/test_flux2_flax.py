"""FLUX.2's VAE in Flax (FlaxAutoencoderKLFlux2) against the PyTorch model: outputs, folders both ways, BFL's
single file, the statistics in params, exact tiling, and the CLI's FLUX.2 latents (torch and Flax)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from conftest import rel_err  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_flux2 import ASYMMETRIC, INFERABLE, _bfl_file, flux2_pair  # noqa: E402

import klvae  # noqa: E402
from klvae.cli import main  # noqa: E402
from klvae.errors import ConfigError  # noqa: E402
from klvae.flax import FlaxAutoencoderKL, FlaxAutoencoderKLFlux2, split_latent_statistics  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    _, ours = flux2_pair(ASYMMETRIC, seed=21)
    path = tmp_path_factory.mktemp("flux2") / "vae"
    ours.save_pretrained(path)
    return ours, str(path)


def test_flax_equals_torch_and_folders_round_trip(saved, tmp_path):
    ours, path = saved
    model, params = FlaxAutoencoderKLFlux2.from_pretrained(path)
    assert model.config == ours.config and params["bn"]["num_batches_tracked"].dtype == jnp.int32
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 18, 14)).astype(np.float32)
    dist = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode").latent_dist)(params, x)
    mean, logvar = dist.mean, dist.logvar
    decoded = jax.jit(lambda p, v: model.apply({"params": p}, v, method="decode").sample)(params, mean)
    with torch.no_grad():
        ref = ours.encode(torch.from_numpy(x)).latent_dist
        ref_decoded = ours.decode(ref.mean).sample
    assert rel_err(mean, ref.mean) <= 1e-4 and rel_err(logvar, ref.logvar) <= 1e-4
    assert rel_err(decoded, ref_decoded) <= 1e-4
    # init_weights makes the same tree (statistics included); save_pretrained is read by klvae and diffusers
    init = model.init_weights(jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(params)
    model.save_pretrained(tmp_path / "out", params)
    back = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "out")
    for k, v in ours.state_dict().items():
        assert v.dtype == back.state_dict()[k].dtype and torch.equal(v, back.state_dict()[k]), k
    # the latent convention comes from params
    z = np.random.default_rng(1).standard_normal((1, 4, 6, 8)).astype(np.float32)
    scaled = klvae.scale_latents(jnp.asarray(z), model, params)
    assert scaled.shape == (1, 16, 3, 4)
    assert rel_err(scaled, klvae.scale_latents(torch.from_numpy(z), ours)) <= 1e-6
    weights, stats = split_latent_statistics(params)
    assert "bn" not in weights and set(stats["bn"]) == {"running_mean", "running_var", "num_batches_tracked"}
    loss = lambda p: model.apply({"params": {**p, **stats}}, x[:1]).sample.sum()  # noqa: E731
    grads = jax.eval_shape(jax.grad(loss), weights)        # traces: the weights alone are differentiable
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(weights)
    with pytest.raises(ConfigError, match="FlaxAutoencoderKLFlux2"):
        FlaxAutoencoderKL.from_pretrained(path)


def test_flax_reads_bfl_file_and_tiles_exactly(tmp_path):
    theirs, ours = flux2_pair(INFERABLE, seed=22)
    model, params = FlaxAutoencoderKLFlux2.from_single_file(_bfl_file(tmp_path, theirs))
    assert model.config == ours.config
    np.testing.assert_array_equal(np.asarray(params["bn"]["running_var"]), ours.bn.running_var.numpy())
    z = np.random.default_rng(2).standard_normal((1, 4, 15, 13)).astype(np.float32)
    untiled = jax.jit(lambda p, v: model.apply({"params": p}, v, method="decode").sample)(params, z)
    tiled = model.with_tiling("exact", tile_sample_min_size=20).apply({"params": params}, z, method="decode").sample
    assert rel_err(tiled, untiled) <= 1e-4
    with torch.no_grad():
        assert rel_err(untiled, ours.decode(torch.from_numpy(z)).sample) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_cli_writes_and_reads_flux2_transformer_latents(saved, tmp_path, backend):
    """``klvae encode --scaled`` writes what FLUX.2's transformer sees (4C, H/2f, W/2f), the image padded to 2f;
    ``klvae decode`` undoes it from the file's metadata."""
    ours, path = saved
    pixels = np.random.default_rng(3).integers(0, 256, (18, 25, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    common = ["-m", path, "--backend", backend, "-q"]
    assert main(["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "lat"), "--scaled", *common]) == 0
    with safe_open(str(tmp_path / "lat" / "a.safetensors"), framework="np") as f:
        latents = f.get_tensor("latents")
        meta = json.loads(f.metadata()["klvae_latents"])
    assert latents.shape == (1, 16, 5, 7)                    # 18x25 padded to 20x28, factor 2, 2x2 patches
    assert meta["scaling"]["patch_size"] == [2, 2] and len(meta["scaling"]["latents_mean"]) == 16
    x = np.pad(pixels, ((0, 2), (0, 3), (0, 0)), mode="symmetric").astype(np.float32) / 255 * 2 - 1
    with torch.no_grad():
        mean = ours.encode(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).latent_dist.mean
    assert rel_err(latents, klvae.scale_latents(mean, ours)) <= 1e-4
    assert main(["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "dec"), *common]) == 0
    decoded = np.asarray(Image.open(tmp_path / "dec" / "a.png"))
    with torch.no_grad():
        ref = ours.decode(mean).sample[0].permute(1, 2, 0).numpy()[:18, :25]
    expected = np.clip(np.round((ref + 1) * 127.5), 0, 255)
    assert decoded.shape == (18, 25, 3) and np.abs(decoded.astype(float) - expected).max() <= 1


def test_cache_stores_flux2_transformer_latents_and_their_log_variance(saved, tmp_path):
    import io

    from test_cache import make_images, write_folder

    from klvae.cache import shards as sh
    from klvae.cache.buckets import load_into_bucket, make_buckets
    from klvae.latents import latent_scaling

    ours, path = saved
    images = make_images(3, seed=4)
    write_folder(tmp_path / "ds", images, nested=False)
    bucket_args = ["--resolution", "32", "--bucket-step", "6", "--max-aspect", "2"]
    assert main(["cache", str(tmp_path / "ds"), "-o", str(tmp_path / "c"), "-m", path, *bucket_args, "--scaled",
                 "--moments", "-q"]) == 2           # 6-px steps do not fit 2x2 latent patches at factor 2
    bucket_args[3] = "8"
    assert main(["cache", str(tmp_path / "ds"), "-o", str(tmp_path / "c"), "-m", path, *bucket_args, "--scaled",
                 "--moments", "-q"]) == 0
    scaling = latent_scaling(ours)
    by_name = {name.split(".")[0]: data for name, data in images}
    for row in sh.read_index(str(tmp_path / "c")):
        with safe_open(str(tmp_path / "c" / row["shard"]), framework="pt") as f:
            latents, logvar = f.get_tensor(row["key"]), f.get_tensor(row["logvar_key"])
        x, _, _ = load_into_bucket(io.BytesIO(by_name[row["id"].split("/")[-1]]), make_buckets(32, 8, 2.0), 3, "t")
        with torch.no_grad():
            dist = ours.encode(torch.from_numpy(x)[None]).latent_dist
        assert latents.shape == logvar.shape == (16, x.shape[1] // 4, x.shape[2] // 4)
        assert rel_err(latents, scaling.scale(dist.mean)[0]) <= 1e-5
        assert rel_err(logvar, scaling.scale_logvar(dist.logvar)[0]) <= 1e-5
