"""Shared test helpers: tiny configs, perturbed random weights, and relative-error assertions."""

from __future__ import annotations

import pytest

# Tiny configurations covering the architecture's variations (kept small: CI has 2 CPU cores).
TINY_CONFIGS = {
    "two_blocks": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1),
    "three_blocks_l2": dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, layers_per_block=2,
                            act_fn="gelu"),
    "sd3_like_16ch": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                          latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=1.5305, shift_factor=0.0609),
    "no_mid_attention_mish": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=2, layers_per_block=1,
                                  mid_block_add_attention=False, act_fn="mish"),
    "gray_one_block_relu": dict(in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4,
                                layers_per_block=1, act_fn="relu"),
}


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (works for torch tensors, numpy and jax arrays)."""
    import numpy as np

    a = np.asarray(_to_numpy(actual), dtype=np.float64)
    e = np.asarray(_to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape}"
    scale = max(float(np.abs(e).max()), 1e-30)
    return float(np.abs(a - e).max()) / scale


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def perturb_(module, seed: int = 0, scale: float = 0.1) -> None:
    """Add seeded noise to every parameter so no weight sits at its init value (zeros, ones)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def saved_model(tmp_path_factory, fields: dict, *, seed: int, scale: float = 0.1) -> str:
    """A klvae model folder (seeded init plus :func:`perturb_` noise) written under a fresh temporary folder."""
    import torch

    import klvae

    torch.manual_seed(0)
    model = klvae.AutoencoderKL(**fields)
    perturb_(model, seed=seed, scale=scale)
    path = tmp_path_factory.mktemp("model") / "vae"
    model.save_pretrained(path)
    return str(path)


def saved_model_fixtures(fields: dict, *, seed: int, scale: float = 0.05):
    """A test module's ``model_dir`` (a saved klvae folder, see :func:`saved_model`) and ``model`` (loaded from
    it, in eval mode) fixtures, module-scoped: ``model_dir, model = saved_model_fixtures(FIELDS, seed=3)``."""

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory):
        return saved_model(tmp_path_factory, fields, seed=seed, scale=scale)

    @pytest.fixture(scope="module")
    def model(model_dir):
        import klvae

        return klvae.AutoencoderKL.from_pretrained(model_dir).eval()

    return model_dir, model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config_name(request) -> str:
    return request.param


def diffusers_pair(fields: dict, seed: int = 0):
    """(diffusers AutoencoderKL, klvae AutoencoderKL) in eval mode with the same perturbed random weights."""
    import diffusers
    import torch

    import klvae

    torch.manual_seed(seed)
    theirs = diffusers.AutoencoderKL(**fields)
    perturb_(theirs, seed=seed)
    ours = klvae.AutoencoderKL(**fields)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


def wait_for_server(url: str, path: str, proc, seconds: float) -> None:
    """Poll ``url + path`` until it answers 200; fail with the server's stderr if ``proc`` exits first."""
    from klvae.serve.probe import wait_until_answering

    wait_until_answering(f"{url}{path}", proc, seconds)
