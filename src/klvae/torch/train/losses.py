"""The objective of latent diffusion's KL autoencoder, as plain functions plus one module that combines them.

Reductions follow the original: per-pixel terms are summed over each image and averaged over the batch; the
LPIPS distance (one number per image) is added to every pixel's reconstruction error; the KL is summed over
the latent. So with 256x256 crops the KL weight 1e-6 balances 196,608 summed pixel errors against 4,096 KL terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klvae.torch.outputs import DiagonalGaussianDistribution
from klvae.train.objective import LossWeights as LossWeights
from klvae.train.objective import adopt_weight as adopt_weight


# ---------------------------------------------------------------------- plain functions
def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 0.0, chroma_weight: float = 0.0) -> torch.Tensor:
    """Per-pixel ``l1_weight * |d| + l2_weight * d^2 + chroma_weight * (d - mean_channels(d))^2`` with
    ``d = x - x_rec``, shape of ``x`` (NCHW). The last term is the squared error off the grey axis: summed over
    channels, it is the error of hue and saturation, without the brightness error."""
    diff = x.float() - x_rec.float()
    loss = torch.zeros_like(diff)
    if l1_weight:
        loss = loss + l1_weight * diff.abs()
    if l2_weight:
        loss = loss + l2_weight * diff.square()
    if chroma_weight:
        loss = loss + chroma_weight * (diff - diff.mean(dim=1, keepdim=True)).square()
    return loss


def nll_loss(rec: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Gaussian-style NLL with a scalar learned output log-variance: ``sum(rec / exp(logvar) + logvar) / B``."""
    return torch.sum(rec / torch.exp(logvar) + logvar) / rec.shape[0]


def kl_loss(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch."""
    kl = posterior.kl()
    return kl.sum() / kl.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The autoencoder's adversarial term: ``-mean(D(x_rec))`` for hinge (as LDM), non-saturating
    ``mean(softplus(-D(x_rec)))`` for vanilla."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; choose hinge or vanilla")


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown adversarial loss {kind!r}; choose hinge or vanilla")


def adaptive_disc_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                         disc_weight: float = 1.0) -> torch.Tensor:
    """``disc_weight * ||d nll / d W|| / (||d g / d W|| + 1e-4)`` at the decoder's last conv weight ``W``, clamped
    to [0, 1e4] and detached: the GAN gradient is scaled to the reconstruction gradient's size."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


# ---------------------------------------------------------------------- the combined objective
class AutoencoderLoss(nn.Module):
    """LDM's ``LPIPSWithDiscriminator``: reconstruction (+ LPIPS) NLL, KL, and a PatchGAN term from ``disc_start``.

    ``perceptual`` is an :class:`~klvae.torch.train.lpips.LPIPS` (required when ``perceptual_weight > 0``);
    ``discriminator`` is required when ``disc_start >= 0``. ``logvar`` is a parameter; it is trained only when
    ``learn_logvar`` (the original code never optimised it, so it stayed at ``logvar_init``).
    """

    def __init__(self, weights: LossWeights, *, perceptual: nn.Module | None = None,
                 discriminator: nn.Module | None = None, logvar_init: float = 0.0, learn_logvar: bool = False):
        super().__init__()
        if weights.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS module")
        if weights.disc_start >= 0 and discriminator is None:
            raise ValueError("disc_start >= 0 needs a discriminator")
        self.weights = weights
        self.perceptual = perceptual
        self.discriminator = discriminator
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=learn_logvar)

    def gan_active(self, step: int) -> bool:
        return adopt_weight(self.weights.disc_factor, step, self.weights.disc_start) > 0

    def autoencoder_loss(self, x: torch.Tensor, x_rec: torch.Tensor, posterior: DiagonalGaussianDistribution,
                         step: int, last_layer: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and detached parts to log. ``last_layer`` (the decoder's conv_out weight) is
        needed for the adaptive GAN weight once the discriminator is on."""
        w = self.weights
        x, x_rec = x.float(), x_rec.float()
        rec = reconstruction_loss(x, x_rec, w.l1_weight, w.l2_weight, w.chroma_weight)
        logs: dict[str, torch.Tensor] = {}
        if w.perceptual_weight > 0:
            p = self.perceptual(x, x_rec)                       # (B, 1, 1, 1), broadcast over every pixel
            rec = rec + w.perceptual_weight * p
            logs["lpips"] = p.detach().mean()
        nll = nll_loss(rec, self.logvar)
        kl = kl_loss(posterior)
        loss = nll + w.kl_weight * kl
        logs.update(nll=nll.detach(), kl=kl.detach(), logvar=self.logvar.detach(),
                    mse=(x - x_rec).square().mean().detach())
        factor = adopt_weight(w.disc_factor, step, w.disc_start)
        if factor > 0:
            logits_fake = self.discriminator(x_rec)
            g = generator_adv_loss(logits_fake, w.disc_loss)
            if w.adaptive_disc_weight and self.training and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs last_layer (decoder.conv_out.weight)")
                d_weight = adaptive_disc_weight(nll, g, last_layer, w.disc_weight)
            else:
                d_weight = torch.tensor(w.disc_weight)
            loss = loss + d_weight * factor * g
            logs.update(g_loss=g.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_step_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int,
                                discriminator: nn.Module | None = None
                                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``x`` and detached reconstructions (no gradient reaches the VAE).
        ``discriminator`` overrides the module's own (e.g. its DDP wrapper)."""
        d = discriminator if discriminator is not None else self.discriminator
        factor = adopt_weight(self.weights.disc_factor, step, self.weights.disc_start)
        logits_real = d(x.detach().float())
        logits_fake = d(x_rec.detach().float())
        d = factor * discriminator_loss(logits_real, logits_fake, self.weights.disc_loss)
        return d, {"d_loss": d.detach(), "logits_real": logits_real.detach().mean(),
                   "logits_fake": logits_fake.detach().mean()}
