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
    when given; all as ``evaluate_images`` of the trainer computes them) plus the colour and border metrics."""
    import torch

    from klvae.torch.train.metrics import psnr, ssim, to_unit
    from klvae.train.data import to_model_input, to_uint8
    from klvae.train.recon_metrics import reconstruction_metrics

    out: dict[str, list[float]] = {"psnr": [], "ssim": []}
    if lpips is not None:
        out["lpips"] = []
    param = next(model.parameters())
    for image in images:
        x = torch.from_numpy(to_model_input(image[None])).to(param.device)
        with torch.no_grad():
            rec = model(x.to(param.dtype)).sample.float()
            a, b = to_unit(x), to_unit(rec)
            out["psnr"].append(float(psnr(a, b)[0]))
            out["ssim"].append(float(ssim(a, b)[0]))
            if lpips is not None:
                out["lpips"].append(float(lpips(x, rec.clamp(-1, 1)).flatten()[0]))
        for key, value in reconstruction_metrics(image, to_uint8(rec.cpu().numpy())[0]).items():
            out.setdefault(key, []).append(value)
    return out


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
