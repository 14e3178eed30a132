"""The PyTorch trainer: one process, or data parallel under ``torchrun`` (DDP; gloo on CPU, nccl on GPU).

``Trainer(config).fit()`` trains until ``optim.max_steps`` and resumes from ``<output_dir>/checkpoints/latest``
when it exists. Each optimiser step draws its batches and posterior noise from (seed, step, rank), so a resumed
run reproduces the same loss curve as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import signal
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from klvae.config import resolve_config
from klvae.errors import ConfigError
from klvae.fileio import atomic_write_bytes
from klvae.train.config import TrainConfig, dump_train_config, posterior_logvar_bias
from klvae.train.data import ImageFolder, load_eval_images, to_model_input, to_uint8
from klvae.torch import auto
from klvae.torch.model import AutoencoderKL
from klvae.torch.outputs import DiagonalGaussianDistribution
from klvae.torch.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from klvae.torch.train.discriminator import NLayerDiscriminator
from klvae.torch.train.ema import EMA
from klvae.torch.train.losses import AutoencoderLoss, LossWeights
from klvae.torch.train.metrics import psnr, ssim, to_unit


def build_model(config: TrainConfig) -> AutoencoderKL:
    """The model a config names: a pretrained folder/file (fine-tuning) or a fresh one from preset + overrides."""
    m = config.model
    if m.pretrained:                           # AutoencoderKL or FLUX.2's VAE, whichever the folder/file holds
        if os.path.isfile(m.pretrained):
            model = auto.from_single_file(m.pretrained, config=m.config or None)
        else:                                  # a diffusers folder, or a hub repo id
            model = auto.from_pretrained(m.pretrained)
        if m.config and not os.path.isfile(m.pretrained):
            warnings.warn("[model] config overrides are ignored when loading a pretrained folder", stacklevel=2)
        model = model.float()
    else:
        torch.manual_seed(config.train.seed)
        fresh = resolve_config(m.preset, strict=False, **m.config)
        model = auto.model_class(fresh.class_name)(config=fresh)
        if m.posterior_logvar_init is not None:
            key, channels = posterior_logvar_bias(model.config)
            with torch.no_grad():
                model.get_parameter(key)[channels] = m.posterior_logvar_init
    return model.train()


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the learning rate at ``step``: linear warm-up, then constant or cosine decay."""
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        t = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = True, device: str | torch.device | None = None):
        self.config = config
        c = config
        if c.train.num_threads:
            torch.set_num_threads(c.train.num_threads)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world_size > 1
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._owns_process_group = self.distributed and not dist.is_initialized()
        if self._owns_process_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.output_dir = c.train.output_dir

        self.model = build_model(c).to(self.device)
        if c.model.update_latent_statistics and not hasattr(self.model, "update_latent_statistics"):
            raise ConfigError(f"[model] update_latent_statistics applies to FLUX.2's VAE (AutoencoderKLFlux2) only; "
                              f"this model is an {self.model.config.class_name}")
        if c.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if c.model.train_decoder_only:
            self.model.encoder.requires_grad_(False)
            if self.model.quant_conv is not None:
                self.model.quant_conv.requires_grad_(False)

        perceptual = None
        if c.loss.perceptual_weight > 0:
            from klvae.torch.train.lpips import LPIPS

            perceptual = LPIPS(c.loss.lpips_weights, allow_random=c.loss.allow_random_lpips)
        discriminator = None
        if c.loss.disc_start >= 0:
            torch.manual_seed(c.train.seed + 1)
            discriminator = NLayerDiscriminator(self.model.config.out_channels, c.loss.disc_channels, c.loss.disc_layers)
        weights = LossWeights.from_config(c.loss)
        self.loss = AutoencoderLoss(weights, perceptual=perceptual, discriminator=discriminator,
                                    logvar_init=c.loss.logvar_init, learn_logvar=c.loss.learn_logvar).to(self.device)

        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.loss.learn_logvar:
            params.append(self.loss.logvar)
        self.opt = torch.optim.AdamW(params, lr=c.optim.lr, betas=c.optim.betas, eps=c.optim.eps,
                                     weight_decay=c.optim.weight_decay)
        self.disc_opt = None
        if discriminator is not None:
            self.disc_opt = torch.optim.AdamW(discriminator.parameters(), lr=c.optim.disc_lr or c.optim.lr,
                                              betas=c.optim.disc_betas, weight_decay=0.0)
        self.ema = EMA(self.model, c.train.ema_decay) if c.train.ema_decay > 0 else None

        self.forward_module = EncodeSampleDecode(self.model)
        self.ddp_model: nn.Module = self.forward_module
        self.ddp_disc: nn.Module | None = discriminator
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.forward_module, device_ids=ids)
            if discriminator is not None:
                # The discriminator's own step goes through DDP; the autoencoder's pass uses the bare module
                # (its parameters are frozen there, and DDP would wait for their gradients).
                self.ddp_disc = DDP(discriminator, device_ids=ids)

        self.data = ImageFolder.from_config(c.data, seed=c.train.seed)
        self.val_images: list[np.ndarray] = []
        if c.data.val_dir and self.is_main:
            _, self.val_images = load_eval_images(c.data.val_dir, c.data.val_size, self.model.config.downsample_factor,
                                                  c.data.max_val_images)
        self.step = 0
        self._stop = False
        if resume:
            path = latest_checkpoint(self.output_dir)
            if path is not None:
                self.load_state(load_checkpoint(path))
                if self.is_main:
                    print(f"resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ lifetime
    def close(self, *, wait_for_peers: bool = True) -> None:
        """Release the DDP wrappers, then the process group when this trainer created it (after a barrier unless
        ``wait_for_peers`` is false, as on an error, when a peer may be gone and the barrier would hang).

        The order matters: a DDP reducer that outlives its process group is destroyed at interpreter exit and
        can abort the process (gloo, "terminate called without an active exception").
        """
        self.ddp_model, self.ddp_disc = self.forward_module, self.loss.discriminator
        gc.collect()
        if self._owns_process_group and dist.is_initialized():
            if wait_for_peers:
                dist.barrier()
            dist.destroy_process_group()
        self._owns_process_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait_for_peers=exc_type is None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model_config": self.model.config.to_diffusers_dict(),  # _class_name: which model class
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "opt": self.opt.state_dict(),
            "logvar": self.loss.logvar.detach().clone(),
            "discriminator": self.loss_discriminator().state_dict() if self.disc_opt else None,
            "disc_opt": self.disc_opt.state_dict() if self.disc_opt else None,
            "train_config": self.config.to_dict(),
        }

    def loss_discriminator(self) -> nn.Module:
        return self.loss.discriminator

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            self.loss.logvar.copy_(state["logvar"])
        if self.ema is not None:
            if state.get("ema") is None:
                warnings.warn("checkpoint has no EMA weights; starting the EMA from the current weights", stacklevel=2)
            else:
                self.ema.load_state_dict(state["ema"])
        if self.disc_opt is not None and state.get("discriminator") is not None:
            self.loss_discriminator().load_state_dict(state["discriminator"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.step = int(state["step"])

    def save(self) -> str | None:
        if not self.is_main:
            return None
        path = save_checkpoint(self.output_dir, self.step, self.state_dict(), keep=self.config.train.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ one optimiser step
    def _autocast(self):
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimiser step (``grad_accum`` micro-batches) at ``self.step``; returns the step's mean losses."""
        c, step = self.config, self.step
        accum = c.optim.grad_accum
        for group in self.opt.param_groups:
            group["lr"] = c.optim.lr * lr_factor(step, c)
        if self.disc_opt is not None:
            for group in self.disc_opt.param_groups:
                group["lr"] = (c.optim.disc_lr or c.optim.lr) * lr_factor(step, c)
        gan = self.loss.gan_active(step)
        totals: dict[str, float] = {}
        self.model.train()
        for micro in range(accum):
            index = step * accum + micro
            x = torch.from_numpy(self.data.batch(index, self.rank)).to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(_seed_for(c.train.seed, step, micro, self.rank, 7))
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync or not self.distributed else self.ddp_model.no_sync()):
                if gan:
                    self.loss_discriminator().requires_grad_(False)
                with self._autocast():
                    posterior, x_rec = self._forward(x, gen)
                    loss, logs = self.loss.autoencoder_loss(x, x_rec, posterior, step,
                                                            last_layer=self.model.decoder.conv_out.weight)
                (loss * (self.data.loss_scale(index) / accum)).backward()
                if c.model.update_latent_statistics:  # FLUX.2: fold the posterior means into its latent statistics
                    self.model.update_latent_statistics(posterior.mean.detach().float())
            if gan:
                self.loss_discriminator().requires_grad_(True)
                with (contextlib.nullcontext() if sync or not self.distributed else self.ddp_disc.no_sync()):
                    with self._autocast():
                        d_loss, d_logs = self.loss.discriminator_step_loss(x, x_rec, step, self.ddp_disc)
                    (d_loss / accum).backward()
                logs.update(d_logs)
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + float(v) / accum
        if c.optim.grad_clip:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                [p for g in self.opt.param_groups for p in g["params"]], c.optim.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if gan:
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        totals["lr"] = self.opt.param_groups[0]["lr"]
        self.step += 1
        return totals

    def _forward(self, x: torch.Tensor, generator: torch.Generator):
        """Encode, sample the posterior, decode (through DDP when distributed, so gradients are reduced)."""
        moments, x_rec = self.ddp_model(x, generator)
        return DiagonalGaussianDistribution(moments), x_rec

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        """Train until ``max_steps`` (default ``optim.max_steps``); checkpoint, log and validate on the way."""
        c = self.config
        max_steps = max_steps or c.optim.max_steps
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            atomic_write_bytes(os.path.join(self.output_dir, "config.toml"), dump_train_config(c).encode())
            _truncate_metrics(self.metrics_path, self.step)
        old_handlers = self._install_signal_handlers()
        bar = self._progress(max_steps)
        last_save, t_log, steps_since_log = time.time(), time.time(), 0
        logs: dict[str, float] = {}
        window: dict[str, float] = {}
        try:
            while self.step < max_steps and not self._stop:
                logs = self.train_step()
                steps_since_log += 1
                for k, v in logs.items():
                    window[k] = window.get(k, 0.0) + v
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.4g}", mse=f"{logs['mse']:.4g}", refresh=False)
                if self.step % c.train.log_every == 0 or self.step == max_steps:
                    dt = time.time() - t_log
                    record = {k: v / steps_since_log for k, v in window.items()}
                    record.update(step=self.step, time=time.time(), sec_per_step=dt / steps_since_log,
                                  images_per_sec=steps_since_log * c.data.batch_size * c.optim.grad_accum
                                  * self.world_size / max(dt, 1e-9))
                    self._log(record, bar)
                    t_log, steps_since_log, window = time.time(), 0, {}
                if self.is_main and self.val_images and self.step % c.train.val_every == 0:
                    self._log({"step": self.step, **{f"val_{k}": v for k, v in self.validate().items()}}, bar)
                if self.is_main and self.step % c.train.sample_every == 0:
                    self.save_samples()
                due = (self.step % c.train.checkpoint_every == 0 or self.step == max_steps or
                       (c.train.checkpoint_minutes and time.time() - last_save > 60 * c.train.checkpoint_minutes))
                if due:
                    self.save()
                    last_save = time.time()
            if self._stop and self.is_main:
                self.save()
                print(f"stopped by signal; checkpoint saved at step {self.step}", file=sys.stderr, flush=True)
        finally:
            if bar is not None:
                bar.close()
            self._restore_signal_handlers(old_handlers)
        return logs

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.output_dir, "metrics.jsonl")

    def _log(self, record: dict[str, Any], bar) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if bar is None:
            parts = " ".join(f"{k}={v:.4g}" for k, v in sorted(record.items())
                             if k not in ("step", "time") and isinstance(v, float))
            print(f"step {record['step']}: {parts}", flush=True)

    def _progress(self, total: int):
        if not (self.is_main and self.config.train.progress):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True, mininterval=5.0)

    def _install_signal_handlers(self):
        """SIGTERM/SIGINT finish the current step, save a checkpoint and return (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop = True

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)

    # ------------------------------------------------------------------ evaluation
    def eval_model(self) -> AutoencoderKL:
        """The weights that would be exported: the EMA average when EMA is on, else the live model."""
        if self.ema is None:
            return self.model
        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean PSNR/SSIM of the validation images reconstructed through the posterior mode."""
        model = self.eval_model().eval()
        values = evaluate_images(model, self.val_images)
        self.model.train()
        return {"psnr": float(np.mean(values["psnr"])), "ssim": float(np.mean(values["ssim"]))}

    @torch.no_grad()
    def save_samples(self) -> str:
        """A PNG grid: originals on the top row, reconstructions below."""
        from PIL import Image

        if self.val_images:
            s = min(min(im.shape[:2]) for im in self.val_images[:4])
            s = s // self.model.config.downsample_factor * self.model.config.downsample_factor
            originals = np.stack([im[:s, :s] for im in self.val_images[:4]])
        else:
            originals = to_uint8(self.data.batch(0)[:4])
        model = self.eval_model().eval()
        x = torch.from_numpy(to_model_input(originals)).to(self.device)
        rec = to_uint8(model(x).sample.float().cpu().numpy())
        self.model.train()
        grid = np.concatenate([np.concatenate(list(originals), axis=1), np.concatenate(list(rec), axis=1)], axis=0)
        path = os.path.join(self.output_dir, "samples", f"step-{self.step:09d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(grid).save(path)
        return path


class EncodeSampleDecode(nn.Module):
    """The training forward pass as one module (what DDP wraps): images -> (posterior moments, reconstruction)."""

    def __init__(self, model: AutoencoderKL):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(x).latent_dist
        return posterior.parameters, self.model.decode(posterior.sample(generator=generator)).sample


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records past ``step`` (left by a run that stopped after its last checkpoint): they will be redone."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


@torch.no_grad()
def evaluate_images(model: AutoencoderKL, images: list[np.ndarray], lpips: nn.Module | None = None,
                    reconstructions: list[np.ndarray] | None = None) -> dict[str, list[float]]:
    """Per-image PSNR/SSIM (and LPIPS when given) of uint8 HWC images reconstructed through the posterior mode;
    each reconstruction (uint8 HWC) is appended to ``reconstructions`` when a list is given."""
    out: dict[str, list[float]] = {"psnr": [], "ssim": []}
    if lpips is not None:
        out["lpips"] = []
    device = model.device
    for image in images:
        x = torch.from_numpy(to_model_input(image[None])).to(device)
        rec = model(x.to(model.dtype)).sample.float()
        a, b = to_unit(x), to_unit(rec)
        out["psnr"].append(float(psnr(a, b)[0]))
        out["ssim"].append(float(ssim(a, b)[0]))
        if lpips is not None:
            out["lpips"].append(float(lpips(x, rec.clamp(-1, 1)).flatten()[0]))
        if reconstructions is not None:
            reconstructions.append(to_uint8(rec.cpu().numpy())[0])
    return out
