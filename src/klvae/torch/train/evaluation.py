"""Reconstruction quality of a VAE on images: load any model (folder, single file, training checkpoint or run),
reconstruct through the posterior's mode, and compute PSNR, SSIM (LPIPS when given) and the colour and border
metrics of :mod:`klvae.train.recon_metrics`. ``klvae eval`` and the default model's recipe use it.
"""

from __future__ import annotations

import os


def load_any_model(path: str | None, use_ema: bool = True):
    """An AutoencoderKL (or FLUX.2's VAE) from a diffusers folder, a training run/checkpoint or a single file (eval
    mode, fp32)."""
    from klvae.torch import auto
    from klvae.torch.train.checkpoint import model_from_checkpoint

    if path is None:
        from klvae import DEFAULT_MODEL

        path = DEFAULT_MODEL
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return auto.from_pretrained(path).float().eval()
        return model_from_checkpoint(path, use_ema=use_ema).float()
    if path.endswith(".pt"):
        import torch

        head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(head, dict) and "model_config" in head:
            return model_from_checkpoint(path, use_ema=use_ema).float()
    return auto.from_single_file(path).float().eval()


def evaluate(model, images: list, lpips=None) -> dict[str, list[float]]:
    """Per-image metrics of uint8 HWC images reconstructed through the posterior mode: PSNR, SSIM (and LPIPS
    when given), as the trainer's ``evaluate_images`` computes them, plus the colour and border metrics."""
    from klvae.torch.train.trainer import evaluate_images
    from klvae.train.recon_metrics import reconstruction_metrics

    reconstructions: list = []
    out = evaluate_images(model, images, lpips, reconstructions)
    for image, rec in zip(images, reconstructions):
        for key, value in reconstruction_metrics(image, rec).items():
            out.setdefault(key, []).append(value)
    return out


def load_model_and_lpips(model: str | None, use_ema: bool, lpips: str, threads: int = 0):
    """``(model, LPIPS module or None)`` as ``klvae eval``'s options name them: ``lpips`` is "yes", "no" or
    "auto" (when its weights are installed); ``threads`` > 0 sets torch's thread count."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    loaded, metric = load_any_model(model, use_ema=use_ema), None
    if lpips != "no":
        from klvae.torch.train.lpips import LPIPS, find_weights

        if lpips == "yes" or find_weights() is not None:
            metric = LPIPS()
    return loaded, metric


def print_table(names: list[str], images: list, values: dict[str, list[float]]) -> list[dict]:
    """Print one row per image (all metrics) under a header; returns the rows as dicts."""
    metrics = list(values)
    width = max(len(n) for n in names)
    print(f"{'image':{width}s}  {'size':>9s}  " + "  ".join(f"{m:>13s}" for m in metrics))
    rows = []
    for i, (name, im) in enumerate(zip(names, images)):
        row = {"image": name, "height": im.shape[0], "width": im.shape[1], **{m: values[m][i] for m in metrics}}
        rows.append(row)
        print(f"{name:{width}s}  {im.shape[0]:>4d}x{im.shape[1]:<4d}  " + "  ".join(f"{row[m]:13.4f}" for m in metrics))
    return rows


def summarize(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Mean and std per metric over the images where it is defined (NaN values, e.g. the colour ratio of a grey
    image, are left out; ``n`` says how many were counted)."""
    import math

    from klvae.torch.train.metrics import mean_std

    out = {}
    for m, v in values.items():
        kept = [x for x in v if not math.isnan(x)]
        out[m] = {**dict(zip(("mean", "std"), mean_std(kept))), "n": len(kept)}
    return out
