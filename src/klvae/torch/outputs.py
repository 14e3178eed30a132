"""Return types of the PyTorch model: the posterior and the output records, as diffusers defines them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from klvae.config import LOGVAR_CLAMP


class _Output:
    """A dataclass record that also indexes like a tuple (``out[0]``) or a dict (``out["sample"]``)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclasses.dataclass
class DecoderOutput(_Output):
    """``sample``: decoded images, (B, C, H, W), nominally in [-1, 1] (not clamped)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


@dataclasses.dataclass
class AutoencoderKLOutput(_Output):
    """``latent_dist``: the posterior over latents."""

    latent_dist: DiagonalGaussianDistribution


class DiagonalGaussianDistribution:
    """A diagonal Gaussian over latents, parametrised by ``parameters = cat([mean, logvar], dim=1)``.

    ``logvar`` is clamped to [-30, 20]. With ``deterministic=True`` the variance is zero: ``sample()`` returns the
    mean and ``kl``/``nll`` are zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, *LOGVAR_CLAMP)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (one per batch item if a list)."""
        eps = randn_like(self.mean, generator)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), summed over (C, H, W): one value per batch item. ``other=None`` means N(0, I)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] | list[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


def randn_like(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn as diffusers' ``randn_tensor`` draws it.

    Noise is drawn on the generator's device (so a CPU generator gives the same numbers whatever device the
    model is on) and moved; a list of generators draws one batch item from each.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        return torch.cat([randn_like(like[i:i + 1], g) for i, g in enumerate(generator)], dim=0)
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)
