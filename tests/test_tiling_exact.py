"""Exact tiling equals the untiled encode/decode (fp32, rel err <= 1e-4; seen ~1e-6), whatever the plan keeps or
recomputes; its GroupNorm statistics are the pooled ones; "auto" falls back to it; blend stays diffusers'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae.torch.exact_tiling as exact_tiling
import klvae.torch.tiling as torch_tiling
from klvae.config import AutoencoderKLConfig
from klvae.tiling_plan import GlobalStep, Pass, plan_exact
from klvae.torch import tiled_decode, tiled_encode
from klvae.torch.attention import AttnProcessor, ChunkedAttnProcessor
from klvae.torch.groupnorm_stats import GroupNormStats, apply_norm

TOL = 1e-4
# A memory limit no plan meets: the planner recomputes all it can (the leanest, slowest plan).
LEANEST = 1.0


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tiles run thousands of small kernels; on a loaded 2-core machine two threads spend most of it
    waiting for each other, so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, seed: int = 0):
    return diffusers_pair(TINY_CONFIGS[name], seed=seed)[1]


def _latents(model, hw, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.latent_channels, *hw, generator=g)


def _images(model, hw, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = model.config.downsample_factor
    x = torch.rand(batch, model.config.in_channels, hw[0] * f, hw[1] * f, generator=g) * 2 - 1
    x[1:] = x[1:] * 0.3 + 0.5  # batch items with different statistics
    return x


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("memory_limit", [None, LEANEST], ids=["store_all", "recompute"])
@pytest.mark.parametrize("lat_hw", [(13, 11), (9, 17)])
def test_exact_decode_equals_untiled(tiny_config_name, lat_hw, memory_limit):
    model = _model(tiny_config_name)
    f = model.config.downsample_factor
    z = _latents(model, lat_hw)
    with torch.no_grad():
        expected = model._decode_latents(z)
        plan = torch_tiling.exact_plan(model, z, "decode", 4 * f, memory_limit)
        got = tiled_decode(model, z, mode="exact", tile_sample_min_size=4 * f, memory_limit=memory_limit)
    assert plan.grid.count >= 9
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("memory_limit", [None, LEANEST], ids=["store_all", "recompute"])
@pytest.mark.parametrize("lat_hw", [(13, 11), (9, 17)])
def test_exact_encode_equals_untiled(tiny_config_name, lat_hw, memory_limit):
    model = _model(tiny_config_name)
    f = model.config.downsample_factor
    x = _images(model, lat_hw)
    with torch.no_grad():
        expected = model._encode_moments(x)
        got = tiled_encode(model, x, mode="exact", tile_sample_min_size=4 * f, memory_limit=memory_limit)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("tile_latents", [1, 2, 3, 5])
def test_any_tile_size_is_exact(tile_latents):
    model = _model("three_blocks_l2")
    f = model.config.downsample_factor
    z, x = _latents(model, (7, 6), batch=1), _images(model, (6, 7), batch=3)
    with torch.no_grad():
        assert rel_err(tiled_decode(model, z, mode="exact", tile_sample_min_size=tile_latents * f),
                       model._decode_latents(z)) <= TOL
        assert rel_err(tiled_encode(model, x, mode="exact", tile_sample_min_size=tile_latents * f),
                       model._encode_moments(x)) <= TOL


def test_model_switch_exact_mode():
    model = _model("two_blocks")
    z, x = _latents(model, (12, 15)), _images(model, (10, 7))
    with torch.no_grad():
        plain_dec, plain_enc, plain_fwd = model.decode(z).sample, model.encode(x).latent_dist, model(x).sample
        model.enable_tiling(mode="exact", tile_sample_min_size=8)
        assert model.tiling_mode == "exact"
        assert rel_err(model.decode(z).sample, plain_dec) <= TOL
        posterior = model.encode(x).latent_dist
        assert rel_err(posterior.mean, plain_enc.mean) <= TOL
        assert rel_err(posterior.logvar, plain_enc.logvar) <= TOL
        assert rel_err(model(x).sample, plain_fwd) <= TOL
        model.enable_slicing()
        assert rel_err(model.decode(z).sample, plain_dec) <= TOL


def test_exact_is_seam_free_where_blend_is_not():
    theirs, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    z = _latents(ours, (16, 16), batch=1)
    with torch.no_grad():
        plain = ours._decode_latents(z)
        blend = tiled_decode(ours, z, mode="blend", tile_sample_min_size=16)
        exact = tiled_decode(ours, z, mode="exact", tile_sample_min_size=16)
        theirs.enable_tiling()
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = 16, 8
        assert rel_err(blend, theirs.tiled_decode(z).sample) <= 1e-5  # blend is still diffusers' output
    assert rel_err(blend, plain) > 1e-2
    assert rel_err(exact, plain) <= TOL


def test_small_inputs_run_untiled():
    model = _model("two_blocks")
    z, x = _latents(model, (8, 8)), _images(model, (8, 8))
    with torch.no_grad():
        plain_dec, plain_enc = model.decode(z).sample, model.encode(x).latent_dist.parameters
        model.enable_tiling(mode="exact", tile_sample_min_size=16)
        assert torch.equal(model.decode(z).sample, plain_dec)
        assert torch.equal(model.encode(x).latent_dist.parameters, plain_enc)
    assert torch_tiling.exact_plan(model, z, "decode", 16).grid.count == 1


def test_long_sequences_use_chunked_attention(monkeypatch):
    model = _model("two_blocks")
    model.set_attn_processor(AttnProcessor())
    z = _latents(model, (12, 10))
    seen = []
    original = ChunkedAttnProcessor.__call__

    def spy(self, *args):
        seen.append(type(self))
        return original(self, *args)

    monkeypatch.setattr(ChunkedAttnProcessor, "__call__", spy)
    monkeypatch.setattr(exact_tiling, "_MAX_ATTENTION_SCORES_BYTES", 1000)
    with torch.no_grad():
        got = tiled_decode(model, z, mode="exact", tile_sample_min_size=8)
        expected = model._decode_latents(z)
    assert seen, "the chunked processor was not used"
    assert all(type(p) is AttnProcessor for p in model.attn_processors.values())  # restored
    assert rel_err(got, expected) <= TOL


def test_tiles_stay_under_the_upsampling_index_limit(monkeypatch):
    """With the 32-bit index limit lowered below the untiled upsample's size but above every tile's, every
    upsample convolution of the exact decode runs whole (no channel slices) and still equals the untiled decode."""
    import klvae.torch.blocks as blocks

    model = _model("three_blocks_l2")
    z = _latents(model, (9, 11))
    plan = torch_tiling.exact_plan(model, z, "decode", 8)
    full_upsample = 2 * 16 * (9 * 4) * (11 * 4)  # batch, channels, the last upsample's output at full size
    assert plan.max_tile_elements() < full_upsample
    calls = []
    direct = blocks.upsample_conv

    def spy(x, weight, *args, **kwargs):
        out = direct(x, weight, *args, **kwargs)
        calls.append(out.numel())
        return out

    with torch.no_grad():
        expected = model._decode_latents(z)
        monkeypatch.setattr(blocks, "_INT32_LIMIT", plan.max_tile_elements())
        monkeypatch.setattr(exact_tiling, "upsample_conv", spy)
        got = tiled_decode(model, z, mode="exact", tile_sample_min_size=8)
    assert calls and max(calls) <= plan.max_tile_elements()
    assert rel_err(got, expected) <= TOL


def test_plan_keeps_tiles_below_int32_indexing():
    """At 16384x16384 the untiled last upsample would hold 2**36 elements; no tile tensor comes near 2**31."""
    config = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)
    plan = plan_exact(config, "decode", (2048, 2048), 1, 4, 32, None)
    assert plan.max_tile_elements() < 2**31 // 16
    assert 256 * 16384 * 16384 > 2**31


# ---------------------------------------------------------------------------------------------- plans
def test_recompute_plan_is_leaner_and_costlier():
    model = _model("three_blocks_l2")
    z = _latents(model, (16, 16))
    fast = torch_tiling.exact_plan(model, z, "decode", 8, memory_limit=1e12)
    lean = torch_tiling.exact_plan(model, z, "decode", 8, memory_limit=LEANEST)
    assert lean.peak_bytes < fast.peak_bytes
    assert lean.flops > fast.flops
    assert len(lean.stored) < len(fast.stored)
    assert fast.flops == pytest.approx(fast.untiled_flops)  # storing everything recomputes nothing
    assert sum(isinstance(s, GlobalStep) for s in fast.steps) == 1  # the attention, once, on the whole latent
    # Every GroupNorm input has its statistics measured before any pass normalises it.
    for plan in (fast, lean):
        measured = set()
        for step in plan.steps:
            if isinstance(step, Pass):
                for name in step.closure:
                    node = plan.graph[name]
                    if node.op == "norm_act_conv" and name not in plan.stored - set(step.store):
                        assert node.inputs[0] in measured, (name, node.inputs[0])
                measured |= set(step.stats)


def test_sd_plan_meets_its_budgets():
    """SD config, fp32: store-all decode at 2048 needs ~1/3 of the untiled memory at the untiled FLOPs; a 6 GiB
    limit at 4096 is met by recomputing."""
    config = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)
    plan = plan_exact(config, "decode", (256, 256), 1, 4, 32, None)
    assert plan.flops == pytest.approx(plan.untiled_flops)
    assert plan.peak_bytes < 0.4 * plan.untiled_peak_bytes
    enc = plan_exact(config, "encode", (256, 256), 1, 4, 32, None)
    assert enc.flops < 1.1 * enc.untiled_flops and enc.peak_bytes < 0.35 * enc.untiled_peak_bytes
    big = plan_exact(config, "decode", (512, 512), 1, 4, 32, 6 * 2**30)
    assert big.peak_bytes <= 6 * 2**30


# ---------------------------------------------------------------------------------------------- statistics
def test_pooled_statistics_include_the_spread_of_tile_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 10, 12, generator=g, dtype=torch.float64)
    x[:, :, :5] += 1000.0  # two halves with very different means
    x[1] *= 3
    stats = GroupNormStats(4)
    for rows in (slice(0, 3), slice(3, 5), slice(5, 10)):
        for cols in (slice(0, 7), slice(7, 12)):
            stats.update(x[:, :, rows, cols])
    var, mean = torch.var_mean(x.unflatten(1, (4, 2)), dim=(2, 3, 4), correction=0)
    assert torch.allclose(stats.mean, mean, rtol=1e-13, atol=0)
    assert torch.allclose(stats.variance(), var, rtol=1e-11, atol=0)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
        expected = F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
        assert rel_err(apply_norm(x, *stats.scale_shift(norm, torch.float64)), expected) <= 1e-10
    # Averaging the tiles' own variances, as per-tile statistics do, misses the 1000-wide spread.
    halves = [x[:, :, :5], x[:, :, 5:]]
    naive = sum(torch.var_mean(h.unflatten(1, (4, 2)), dim=(2, 3, 4), correction=0)[0] for h in halves) / 2
    assert (var / naive).min() > 1000


def test_statistics_reject_mismatched_groups():
    stats = GroupNormStats(2)
    stats.update(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        stats.scale_shift(torch.nn.GroupNorm(4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="no tiles"):
        GroupNormStats(2).variance()


# ---------------------------------------------------------------------------------------------- auto mode
def test_auto_runs_untiled_when_it_fits(monkeypatch):
    model = _model("two_blocks")
    z = _latents(model, (12, 12))
    monkeypatch.setattr(torch_tiling, "run_exact", _fail)
    with torch.no_grad():
        assert torch.equal(tiled_decode(model, z, mode="auto", memory_limit=1e12), model._decode_latents(z))


def test_auto_tiles_when_the_estimate_is_over_the_limit(monkeypatch):
    model = _model("two_blocks")
    z = _latents(model, (12, 12))
    used = _count_exact(monkeypatch)
    with torch.no_grad():
        got = tiled_decode(model, z, mode="auto", tile_sample_min_size=8, memory_limit=1e4)
        assert rel_err(got, model._decode_latents(z)) <= TOL
    assert used == [1]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_auto_recovers_from_out_of_memory(monkeypatch, error):
    model = _model("two_blocks")
    model.enable_tiling(mode="auto", tile_sample_min_size=8, memory_limit=1e12)
    x = _images(model, (12, 10))
    with torch.no_grad():
        expected = model._encode_moments(x)
    real = model._encode_moments

    def flaky(images):
        if images.shape[-1] == x.shape[-1] and images.shape[-2] == x.shape[-2]:
            raise error
        return real(images)

    monkeypatch.setattr(model, "_encode_moments", flaky)
    used = _count_exact(monkeypatch)
    with torch.no_grad():
        got = model.encode(x).latent_dist.parameters
    assert used == [1]
    assert rel_err(got, expected) <= TOL


def test_auto_does_not_swallow_other_errors(monkeypatch):
    model = _model("two_blocks")
    monkeypatch.setattr(model, "_decode_latents", lambda z: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"), torch.no_grad():
        tiled_decode(model, _latents(model, (12, 12)), mode="auto", memory_limit=1e12)


def _fail(*args, **kwargs):
    raise AssertionError("exact tiling ran")


def _count_exact(monkeypatch) -> list[int]:
    calls = [0]
    real = torch_tiling.run_exact

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_tiling, "run_exact", counted)
    return calls


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    model = _model("two_blocks")
    z = _latents(model, (12, 12))
    with pytest.raises(ValueError, match="unknown tiling mode"):
        tiled_decode(model, z, mode="magic")
    with pytest.raises(ValueError, match="memory_limit"):
        tiled_decode(model, z, mode="exact", memory_limit=0)
    with pytest.raises(ValueError, match="memory_limit"):
        model.enable_tiling(mode="exact", memory_limit=-1)
    with pytest.raises(RuntimeError, match="no_grad"):
        tiled_decode(model, z.requires_grad_(), mode="exact", tile_sample_min_size=8)
