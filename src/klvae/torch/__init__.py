"""The PyTorch backend."""

from klvae.torch.attention import AttnProcessor as AttnProcessor
from klvae.torch.attention import AttnProcessor2_0 as AttnProcessor2_0
from klvae.torch.attention import ChunkedAttnProcessor as ChunkedAttnProcessor
from klvae.torch.flux2 import AutoencoderKLFlux2 as AutoencoderKLFlux2
from klvae.torch.model import AutoencoderKL as AutoencoderKL
from klvae.torch.outputs import AutoencoderKLOutput as AutoencoderKLOutput
from klvae.torch.outputs import DecoderOutput as DecoderOutput
from klvae.torch.outputs import DiagonalGaussianDistribution as DiagonalGaussianDistribution
from klvae.torch.tiling import tiled_decode as tiled_decode
from klvae.torch.tiling import tiled_encode as tiled_encode
