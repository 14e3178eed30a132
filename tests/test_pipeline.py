"""A klvae AutoencoderKL passed as ``vae=`` to a diffusers pipeline gives diffusers' images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import diffusers_pair

import klvae

VAE_FIELDS = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                  latent_channels=4, sample_size=32)


def _pipeline(vae, cls_name="StableDiffusionPipeline"):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return getattr(diffusers, cls_name)(vae=vae, text_encoder=None, tokenizer=None, unet=unet.eval(),
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _run(pipe, output_type="np"):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, 16, generator=g)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2,
                height=32, width=48, guidance_scale=2.0, generator=torch.Generator().manual_seed(1),
                output_type=output_type).images


def test_stable_diffusion_pipeline_with_klvae_vae():
    pytest.importorskip("transformers")
    theirs, ours = diffusers_pair(VAE_FIELDS)
    expected = _run(_pipeline(theirs))
    pipe = _pipeline(ours)
    assert pipe.vae is ours and pipe.vae_scale_factor == 2
    images = _run(pipe)
    assert images.shape == expected.shape == (1, 32, 48, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    # Moving the pipeline moves and casts our VAE like any component.
    pipe.to(torch.float64)
    assert isinstance(pipe.vae, klvae.AutoencoderKL) and pipe.vae.dtype == torch.float64


def test_img2img_pipeline_encodes_with_klvae():
    """img2img draws from the posterior with the pipeline's generator: encode parity end to end."""
    theirs, ours = diffusers_pair(VAE_FIELDS)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))

    def run(vae):
        pipe = _pipeline(vae, "StableDiffusionImg2ImgPipeline")
        embeds = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(0))
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), image=image,
                    strength=0.6, num_inference_steps=4, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(1), output_type="np").images

    np.testing.assert_allclose(run(ours), run(theirs), atol=1e-5, rtol=0)
