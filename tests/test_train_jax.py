"""The JAX trainer on tiny configs: loss goes down, exact resume, GAN/accumulation/decoder-only, a 2-device mesh,
and the torch and JAX objectives agreeing on the same weights and batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("optax")
jax = pytest.importorskip("jax")

from test_train import _config, _write_images  # noqa: E402


def test_loss_goes_down_and_resume_is_exact(tmp_path):
    from klvae.flax.train.trainer import Trainer

    one = tmp_path / "one"
    _write_images(str(one), n=1, size=(18, 18))
    cfg = _config(tmp_path, data={"train_dir": str(one), "val_dir": str(one)},
                  optim={"max_steps": 20, "warmup_steps": 2}, train={"checkpoint_every": 18, "ema_decay": 0.9,
                                                                     "log_every": 6, "val_every": 18})
    t = Trainer(cfg, resume=False)
    first = [t.train_step()["nll"] for _ in range(3)]
    t.fit(18)
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step-000000018.msgpack")
    later = [t.train_step()["nll"] for _ in range(2)]
    assert np.mean(later) < 0.5 * np.mean(first), (first, later)
    resumed = Trainer(cfg)
    assert resumed.step == 18
    assert [resumed.train_step()["nll"] for _ in range(2)] == later          # bit-identical
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_psnr" in r for r in records) and any(r.get("step") == 12 for r in records)
    resumed.export(str(tmp_path / "exported"))
    from klvae.torch.model import AutoencoderKL
    assert AutoencoderKL.from_pretrained(str(tmp_path / "exported")).config.block_out_channels == (8, 16)


def test_torch_and_jax_objectives_agree(tmp_path, monkeypatch):
    """Same VAE, discriminator and LPIPS weights, same batch and posterior noise: same loss terms."""
    import jax.numpy as jnp
    import torch

    from klvae.flax.outputs import FlaxDiagonalGaussianDistribution
    from klvae.flax.train.discriminator import discriminator_variables_from_torch
    from klvae.flax.train.lpips import lpips_params
    from klvae.flax.train.trainer import Trainer as JaxTrainer
    from klvae.torch.outputs import DiagonalGaussianDistribution
    from klvae.torch.train.trainer import Trainer as TorchTrainer
    from klvae.weights.flax import canonical_to_flax

    cfg = _config(tmp_path, data={"crop_size": 32, "batch_size": 2, "val_dir": None},
                  loss={"disc_start": 0, "disc_channels": 8, "disc_layers": 2, "perceptual_weight": 0.5,
                        "allow_random_lpips": True, "l2_weight": 0.3, "chroma_weight": 0.7, "kl_weight": 1e-3,
                        "logvar_init": 0.2})
    tt = TorchTrainer(cfg, resume=False)
    jt = JaxTrainer(cfg.replace(train={"output_dir": str(tmp_path / "jrun")}), resume=False)
    with torch.no_grad():                                     # move weights off their init values
        g = torch.Generator().manual_seed(1)
        for p in list(tt.model.parameters()) + list(tt.loss.discriminator.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = dict(jt.state)
    state["trainable"] = {**state["trainable"], "vae": jax.tree_util.tree_map(
        jnp.asarray, canonical_to_flax(tt.model.state_dict(), tt.model.config))}
    dv = discriminator_variables_from_torch(tt.loss.discriminator.state_dict(), 2)
    state["disc"], state["disc_stats"] = (jax.tree_util.tree_map(jnp.asarray, dv["params"]),
                                          jax.tree_util.tree_map(jnp.asarray, dv["batch_stats"]))
    jt.state = state
    lp = {k.replace("convs.", "conv").replace("lins.", "lin"): v.numpy()
          for k, v in tt.loss.perceptual.state_dict().items()}
    jt.lpips = lpips_params(lp)
    eps = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * torch.from_numpy(eps))
    monkeypatch.setattr(FlaxDiagonalGaussianDistribution, "sample",
                        lambda self, key: self.mean + self.std * jnp.asarray(eps))
    lt, lj = tt.train_step(), jt.train_step()
    for key in ("loss", "nll", "kl", "mse", "lpips", "g_loss", "d_weight", "d_loss", "logits_real", "logits_fake"):
        assert lj[key] == pytest.approx(lt[key], rel=2e-3, abs=1e-5), (key, lt[key], lj[key])


def test_gan_accumulation_decoder_only(tmp_path):
    from klvae.flax.train.trainer import Trainer

    cfg = _config(tmp_path, model={"train_decoder_only": True}, optim={"grad_accum": 2, "grad_clip": 1.0},
                  loss={"disc_start": 1, "disc_channels": 8, "disc_layers": 2},
                  data={"val_dir": None, "crop_size": [16, 32]})          # mixed sizes: one micro-batch each
    t = Trainer(cfg, resume=False)
    enc = jax.device_get(t.state["trainable"]["vae"]["encoder"])
    dec = jax.device_get(t.state["trainable"]["vae"]["decoder"])
    logs = [t.train_step() for _ in range(3)]
    assert "d_loss" not in logs[0] and logs[2]["d_weight"] > 0
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), enc,
                                  jax.device_get(t.state["trainable"]["vae"]["encoder"]))
    assert all(jax.tree_util.tree_leaves(same))
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), dec,
                                     jax.device_get(t.state["trainable"]["vae"]["decoder"]))
    assert any(jax.tree_util.tree_leaves(changed))


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import jax
    from test_train import _config
    import pathlib
    from klvae.flax.train.trainer import Trainer
    tmp = pathlib.Path(sys.argv[1])
    t = Trainer(_config(tmp, data={"val_dir": None}), resume=False)
    x = t.global_batch(0)
    losses = [t.train_step()["loss"] for _ in range(2)]
    leaf = jax.tree_util.tree_leaves(t.state["trainable"])[0]
    print(json.dumps({"devices": t.n_data, "batch": list(x.shape), "batch_shards": len(x.addressable_shards),
                      "param_devices": len(leaf.sharding.device_set), "losses": losses}))
""")


@pytest.mark.slow
def test_two_device_mesh(tmp_path):
    (tmp_path / "mesh.py").write_text(MESH_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(tmp_path / "mesh.py"), str(tmp_path), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["batch"] == [4, 3, 16, 16] and out["batch_shards"] == 2
    assert out["param_devices"] == 2 and all(np.isfinite(out["losses"]))
