"""The JAX/Flax (linen) backend: ``FlaxAutoencoderKL`` with the PyTorch backend's config and weights.

Imports jax and flax, never torch.
"""

from klvae.flax.attention import FlaxAttentionBlock as FlaxAttentionBlock
from klvae.flax.blocks import FlaxDownEncoderBlock2D as FlaxDownEncoderBlock2D
from klvae.flax.blocks import FlaxDownsample2D as FlaxDownsample2D
from klvae.flax.blocks import FlaxResnetBlock2D as FlaxResnetBlock2D
from klvae.flax.blocks import FlaxUNetMidBlock2D as FlaxUNetMidBlock2D
from klvae.flax.blocks import FlaxUpDecoderBlock2D as FlaxUpDecoderBlock2D
from klvae.flax.blocks import FlaxUpsample2D as FlaxUpsample2D
from klvae.flax.flux2 import FlaxAutoencoderKLFlux2 as FlaxAutoencoderKLFlux2
from klvae.flax.flux2 import split_latent_statistics as split_latent_statistics
from klvae.flax.model import FlaxAutoencoderKL as FlaxAutoencoderKL
from klvae.flax.model import FlaxDecoder as FlaxDecoder
from klvae.flax.model import FlaxEncoder as FlaxEncoder
from klvae.flax.outputs import FlaxAutoencoderKLOutput as FlaxAutoencoderKLOutput
from klvae.flax.outputs import FlaxDecoderOutput as FlaxDecoderOutput
from klvae.flax.outputs import FlaxDiagonalGaussianDistribution as FlaxDiagonalGaussianDistribution
from klvae.flax.tiling import tiled_decode as tiled_decode
from klvae.flax.tiling import tiled_encode as tiled_encode
from klvae.flax.parallel import replicate as replicate
from klvae.flax.parallel import shard_batch as shard_batch
