"""A model's own latent scale: ``scaling_factor = 1 / std`` of the posterior means over the training set.

This is latent diffusion's rule (it divided by the std of the first batch's latents so that a diffusion model
sees unit-variance latents). Here the std is taken over every element (all channels, positions and images pooled,
about their common mean) of the posterior means of every training image, each encoded whole (cut to a multiple of
the downsampling factor): deterministic, no crop sampling, and the same statistics the model meets on whole
photographs. Larger images weigh more, in proportion to their pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np


class RunningMoments:
    """Count, mean and sum of squared deviations over batches of values, merged exactly (Chan et al.) in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        n, mean = v.size, float(v.mean())
        m2 = float(((v - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (NaN before any value)."""
        return math.sqrt(self.m2 / self.count) if self.count else math.nan


def posterior_mean_std(encode_mean: Callable[[np.ndarray], np.ndarray], images: Iterable[np.ndarray]
                       ) -> tuple[float, float, int]:
    """(std, mean, element count) of ``encode_mean(image)`` pooled over ``images``."""
    moments = RunningMoments()
    for image in images:
        moments.add(encode_mean(image))
    if moments.count == 0:
        raise ValueError("no images to compute the latent scale from")
    return moments.std, moments.mean, moments.count


def scaling_factor(encode_mean: Callable[[np.ndarray], np.ndarray], images: Iterable[np.ndarray]) -> float:
    """``1 / std`` of the pooled posterior means."""
    std = posterior_mean_std(encode_mean, images)[0]
    if not std > 0:
        raise ValueError(f"posterior means have std {std}: cannot scale by its inverse")
    return 1.0 / std


def torch_encode_mean(model) -> Callable[[np.ndarray], np.ndarray]:
    """For a klvae PyTorch AutoencoderKL: (H, W, 3) uint8 -> posterior mean (C, H/f, W/f), computed in fp32."""
    import torch

    from klvae.train.data import center_crop, to_model_input

    f = model.config.downsample_factor
    param = next(model.parameters())

    def encode(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(to_model_input(center_crop(image, None, f)[None])).to(param.device, param.dtype)
        with torch.no_grad():
            return model.encode(x).latent_dist.mean[0].float().cpu().numpy()

    return encode


def model_scaling_factor(model, folder: str) -> tuple[float, int]:
    """The rule for a PyTorch model over the images in ``folder`` (each whole): (scaling_factor, image count)."""
    from klvae.train.data import DatasetError, list_images, load_rgb

    paths = list_images(folder)
    if not paths:
        raise DatasetError(f"{folder}: no images to compute the latent scale from")
    return scaling_factor(torch_encode_mean(model), (load_rgb(p) for p in paths)), len(paths)
