"""PyTorch training: the LDM losses, LPIPS, the PatchGAN discriminator, metrics and the trainer."""

from klvae.torch.train.discriminator import NLayerDiscriminator as NLayerDiscriminator
from klvae.torch.train.losses import AutoencoderLoss as AutoencoderLoss
from klvae.torch.train.lpips import LPIPS as LPIPS

__all__ = ["AutoencoderLoss", "LPIPS", "NLayerDiscriminator"]
