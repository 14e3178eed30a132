"""The JAX trainer: optax, one jitted step, batch data parallel over a device mesh; the same TOML config and
objective as the PyTorch trainer.

The batch is sharded over the mesh's ``"data"`` axis and the state replicated, so XLA reduces gradients (and the
discriminator's BatchNorm statistics) across devices. ``data.batch_size`` is per device, as it is per process in
the PyTorch trainer. Checkpoints (msgpack, atomic) hold everything a run needs; batches and noise are functions of
(seed, step), so a resumed run repeats the loss curve of one that never stopped.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from klvae.config import resolve_config
from klvae.fileio import atomic_write_bytes
from klvae.flax.model import FlaxAutoencoderKL
from klvae.flax.train.discriminator import FlaxNLayerDiscriminator
from klvae.flax.train.losses import (adaptive_weight_from_grads, discriminator_loss, generator_adv_loss, kl_loss,
                                     nll_loss, reconstruction_loss)
from klvae.flax.train.lpips import lpips, lpips_params
from klvae.train import metrics as np_metrics
from klvae.train.config import TrainConfig, dump_train_config, posterior_logvar_bias
from klvae.train.data import ImageFolder, load_eval_images, to_model_input
from klvae.train.objective import LossWeights, adopt_weight

LAST_LAYER = ("decoder", "conv_out", "kernel")


def lr_schedule(config: TrainConfig, base_lr: float):
    """optax schedule: linear warm-up, then constant or cosine (the PyTorch trainer's ``lr_factor``)."""
    o = config.optim

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = (count + 1) / max(o.warmup_steps, 1)
        t = jnp.clip((count - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps), 0.0, 1.0)
        decay = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * t)) if o.schedule == "cosine" \
            else 1.0
        factor = jnp.where(count < o.warmup_steps, warm, decay) if o.warmup_steps else decay
        return base_lr * factor

    return schedule


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = True, devices: list | None = None):
        c = self.config = config
        self.weights = LossWeights.from_config(c.loss)
        self.mesh = Mesh(np.array(devices or jax.devices()), ("data",))
        self.n_data = self.mesh.size
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.output_dir = c.train.output_dir

        if c.model.pretrained:
            self.model, params = FlaxAutoencoderKL.from_pretrained(c.model.pretrained)
        else:
            self.model = FlaxAutoencoderKL.from_config(resolve_config(c.model.preset, **c.model.config))
            params = init_params(self.model.config, c.train.seed, c.model.posterior_logvar_init)
        self.lpips = (lpips_params(c.loss.lpips_weights, allow_random=c.loss.allow_random_lpips)
                      if c.loss.perceptual_weight > 0 else None)
        trainable = {"vae": params, "logvar": jnp.asarray(c.loss.logvar_init, jnp.float32)}
        self.tx = self._optimizer(trainable)
        state: dict[str, Any] = {"trainable": trainable, "opt": self.tx.init(trainable),
                                 "ema": jax.tree_util.tree_map(jnp.array, params) if c.train.ema_decay > 0 else None}
        self.disc = None
        if c.loss.disc_start >= 0:
            self.disc = FlaxNLayerDiscriminator(self.model.config.out_channels, c.loss.disc_channels,
                                                c.loss.disc_layers)
            crop = max(c.data.crop_sizes)
            variables = self.disc.init(jax.random.PRNGKey(c.train.seed + 1), jnp.zeros((1, 3, crop, crop)), True)
            self.disc_tx = self._wrap_accum(optax.adamw(lr_schedule(c, c.optim.disc_lr or c.optim.lr),
                                                        *c.optim.disc_betas, eps=c.optim.eps, weight_decay=0.0))
            state.update(disc=variables["params"], disc_stats=variables["batch_stats"],
                         disc_opt=self.disc_tx.init(variables["params"]))
        self.state = jax.device_put(state, self.replicated)
        self.step = 0
        self.data = ImageFolder.from_config(c.data, seed=c.train.seed)
        self.val_images: list[np.ndarray] = []
        if c.data.val_dir:
            _, self.val_images = load_eval_images(c.data.val_dir, c.data.val_size,
                                                  self.model.config.downsample_factor, c.data.max_val_images)
        self._micro = jax.jit(self._micro_step, static_argnames=("gan",), donate_argnums=(0,))
        self._ema = jax.jit(self._ema_update)
        self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x).sample)
        if resume:
            path = latest_checkpoint(self.output_dir)
            if path is not None:
                self.load(path)
                print(f"resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ optimisers
    def _wrap_accum(self, tx):
        k = self.config.optim.grad_accum
        return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx

    def _optimizer(self, trainable):
        c = self.config
        inner = optax.adamw(lr_schedule(c, c.optim.lr), *c.optim.betas, eps=c.optim.eps,
                            weight_decay=c.optim.weight_decay)
        if c.optim.grad_clip:
            inner = optax.chain(optax.clip_by_global_norm(c.optim.grad_clip), inner)
        frozen = ("encoder", "quant_conv") if c.model.train_decoder_only else ()

        def label(path, _):
            if path[0] == "logvar":
                return "train" if c.loss.learn_logvar else "freeze"
            return "freeze" if path[1] in frozen else "train"

        labels = traverse_util.path_aware_map(label, trainable)
        return self._wrap_accum(optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels))

    # ------------------------------------------------------------------ the jitted steps
    def _apply_vae(self, params, x, key):
        posterior = self.model.apply({"params": params}, x, method=FlaxAutoencoderKL.encode).latent_dist
        z = posterior.sample(key)
        return posterior, self.model.apply({"params": params}, z, method=FlaxAutoencoderKL.decode).sample

    def loss_parts(self, trainable, x, key, disc_vars=None):
        """(nll, kl, g) and (reconstruction, updated discriminator batch stats, logs): the autoencoder's terms."""
        w = self.weights
        posterior, x_rec = self._apply_vae(trainable["vae"], x, key)
        rec = reconstruction_loss(x, x_rec, w.l1_weight, w.l2_weight, w.chroma_weight)
        logs = {}
        if self.lpips is not None:
            p = lpips(self.lpips, x, x_rec)
            rec = rec + w.perceptual_weight * p
            logs["lpips"] = jnp.mean(p)
        nll, kl = nll_loss(rec, trainable["logvar"]), kl_loss(posterior)
        g, stats = jnp.zeros(()), None
        if disc_vars is not None:
            logits, updated = self.disc.apply(disc_vars, x_rec, True, mutable=["batch_stats"])
            g, stats = generator_adv_loss(logits, w.disc_loss), updated["batch_stats"]
        logs.update(mse=jnp.mean(jnp.square(x - x_rec)))
        return (nll, kl, g), (x_rec, stats, logs)

    def _micro_step(self, state, x, key, scale, gan: bool):
        """One micro-batch: the autoencoder's (and discriminator's) gradients, the autoencoder's weighted by
        ``scale`` (the data's loss scale for mixed crop sizes)."""
        w = self.weights
        disc_vars = {"params": state["disc"], "batch_stats": state["disc_stats"]} if gan else None
        (nll, kl, g), vjp, (x_rec, stats, logs) = jax.vjp(
            lambda t: self.loss_parts(t, x, key, disc_vars), state["trainable"], has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        coef_g = zero
        if gan:
            if w.adaptive_disc_weight:
                # Only the last layer's cotangents are used: XLA prunes the rest of these two backward passes.
                nll_grad = _at(vjp((one, zero, zero))[0]["vae"], LAST_LAYER)
                g_grad = _at(vjp((zero, zero, one))[0]["vae"], LAST_LAYER)
                d_weight = adaptive_weight_from_grads(nll_grad, g_grad, w.disc_weight)
            else:
                d_weight = jnp.asarray(w.disc_weight)
            coef_g = d_weight * w.disc_factor
            logs.update(g_loss=g, d_weight=d_weight)
        grads = vjp((scale * one, scale * jnp.asarray(w.kl_weight, jnp.float32), scale * coef_g))[0]
        loss = nll + w.kl_weight * kl + coef_g * g
        logs.update(loss=loss, nll=nll, kl=kl, logvar=state["trainable"]["logvar"])
        updates, opt = self.tx.update(grads, state["opt"], state["trainable"])
        state = {**state, "trainable": optax.apply_updates(state["trainable"], updates), "opt": opt}
        if gan:
            def d_loss_fn(dp):
                real, upd = self.disc.apply({"params": dp, "batch_stats": stats}, x, True, mutable=["batch_stats"])
                fake, upd = self.disc.apply({"params": dp, "batch_stats": upd["batch_stats"]},
                                            jax.lax.stop_gradient(x_rec), True, mutable=["batch_stats"])
                d = w.disc_factor * discriminator_loss(real, fake, w.disc_loss)
                return d, (upd["batch_stats"], jnp.mean(real), jnp.mean(fake))

            (d, (new_stats, real, fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["disc"])
            d_updates, d_opt = self.disc_tx.update(d_grads, state["disc_opt"], state["disc"])
            state.update(disc=optax.apply_updates(state["disc"], d_updates), disc_opt=d_opt, disc_stats=new_stats)
            logs.update(d_loss=d, logits_real=real, logits_fake=fake)
        return state, logs

    def _ema_update(self, ema, params, num_updates):
        d = jnp.minimum(self.config.train.ema_decay, (1.0 + num_updates) / (10.0 + num_updates))
        return jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)

    # ------------------------------------------------------------------ public API
    def global_batch(self, index: int) -> jax.Array:
        x = np.concatenate([self.data.batch(index, rank) for rank in range(self.n_data)])
        return jax.device_put(x, self.batch_sharding)

    def train_step(self) -> dict[str, float]:
        c, step = self.config, self.step
        gan = adopt_weight(self.weights.disc_factor, step, self.weights.disc_start) > 0
        accum = c.optim.grad_accum
        totals: dict[str, float] = {}
        base = jax.random.fold_in(jax.random.PRNGKey(c.train.seed), step)
        for micro in range(accum):
            index = step * accum + micro
            scale = jnp.asarray(self.data.loss_scale(index), jnp.float32)
            self.state, logs = self._micro(self.state, self.global_batch(index), jax.random.fold_in(base, micro),
                                           scale, gan=gan)
            for k, v in jax.device_get(logs).items():
                totals[k] = totals.get(k, 0.0) + float(v) / accum
        if self.state["ema"] is not None:
            self.state["ema"] = self._ema(self.state["ema"], self.state["trainable"]["vae"], float(step + 1))
        totals["lr"] = float(lr_schedule(c, c.optim.lr)(step))
        self.step += 1
        return totals

    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        c = self.config
        max_steps = max_steps or c.optim.max_steps
        os.makedirs(self.output_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(self.output_dir, "config.toml"), dump_train_config(c).encode())
        logs: dict[str, float] = {}
        t0, n = time.time(), 0
        while self.step < max_steps:
            logs = self.train_step()
            n += 1
            if self.step % c.train.log_every == 0 or self.step == max_steps:
                dt = time.time() - t0
                self._log({**logs, "step": self.step, "sec_per_step": dt / n})
                t0, n = time.time(), 0
            if self.val_images and self.step % c.train.val_every == 0:
                self._log({"step": self.step, **{f"val_{k}": v for k, v in self.validate().items()}})
            if self.step % c.train.checkpoint_every == 0 or self.step == max_steps:
                self.save()
        return logs

    def export_params(self):
        """The weights to ship: the EMA average when EMA is on, else the live parameters."""
        return self.state["ema"] if self.state["ema"] is not None else self.state["trainable"]["vae"]

    def export(self, out_dir: str, dtype: Any = None) -> None:
        self.model.save_pretrained(out_dir, jax.device_get(self.export_params()), dtype=dtype)

    def validate(self) -> dict[str, float]:
        params = self.export_params()
        p, s = [], []
        for image in self.val_images:
            x = to_model_input(image[None])
            rec = np.asarray(self._reconstruct(params, jnp.asarray(x)))
            a, b = np_metrics.to_unit(x), np_metrics.to_unit(rec)
            p.append(float(np_metrics.psnr(a, b)[0]))
            s.append(float(np_metrics.ssim(a, b)[0]))
        return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s))}

    def _log(self, record: dict[str, Any]) -> None:
        with open(os.path.join(self.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.config.train.progress or record.get("step", 0) % self.config.train.log_every == 0:
            print(f"step {record['step']}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(record.items())
                                                        if k != "step"), flush=True)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        blob = serialization.msgpack_serialize({"step": self.step, "model_config": self.model.config.to_dict(),
                                                "state": serialization.to_state_dict(jax.device_get(self.state))})
        folder = os.path.join(self.output_dir, "checkpoints")
        path = os.path.join(folder, f"step-{self.step:09d}.msgpack")
        atomic_write_bytes(path, blob)
        atomic_write_bytes(os.path.join(folder, "latest"), os.path.basename(path).encode() + b"\n")
        keep = self.config.train.keep_checkpoints
        old = sorted(f for f in os.listdir(folder) if f.startswith("step-") and f.endswith(".msgpack"))
        for name in old[:-keep]:
            os.remove(os.path.join(folder, name))
        return path

    def load(self, path: str) -> None:
        with open(path, "rb") as f:
            data = serialization.msgpack_restore(f.read())
        template = jax.device_get(self.state)
        self.state = jax.device_put(serialization.from_state_dict(template, data["state"]), self.replicated)
        self.step = int(data["step"])


def init_params(config, seed: int, posterior_logvar_init: float | None = None) -> dict[str, Any]:
    """Fresh parameters with PyTorch's default initialisation (as diffusers' models start), converted to the Flax
    tree; with torch absent, Flax's own initialisers. (Converting is also far quicker than compiling Flax's init.)
    ``posterior_logvar_init``: as the config's ``[model]`` field of that name."""
    from klvae.weights.flax import canonical_to_flax, flax_to_canonical

    try:
        import torch
    except ImportError:
        model = FlaxAutoencoderKL.from_config(config)
        state = {k: np.array(v) for k, v in flax_to_canonical(jax.jit(model.init_weights)(jax.random.PRNGKey(seed)),
                                                             config).items()}
    else:
        from klvae.torch.model import AutoencoderKL

        torch.manual_seed(seed)
        state = {k: v.numpy() for k, v in AutoencoderKL(config=config).state_dict().items()}
    if posterior_logvar_init is not None:
        key, channels = posterior_logvar_bias(config)
        state[key][channels] = posterior_logvar_init
    return jax.tree_util.tree_map(jnp.asarray, canonical_to_flax(state, config))


def latest_checkpoint(output_dir: str) -> str | None:
    folder = os.path.join(output_dir, "checkpoints")
    pointer = os.path.join(folder, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(folder, f.read().strip())
        if os.path.isfile(path) and path.endswith(".msgpack"):
            return path
    return None


def _at(tree, path):
    return functools.reduce(lambda t, k: t[k], path, tree)
