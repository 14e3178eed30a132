"""Exact tiling with spill files: activations kept in temporary files instead of recomputed (klvae.tiling_spill)."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae.tiling_spill as tiling_spill
import klvae.torch.tiling as torch_tiling
from klvae.config import AutoencoderKLConfig
from klvae.tiling_plan import plan_exact
from klvae.torch.exact_tiling import TorchTileOps

TOL = 1e-4
LEANEST = 1.0  # a memory limit no plan meets: everything that can be spilled is


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spill_dir(tmp_path):
    folder = tmp_path / "spill"
    folder.mkdir()
    return str(folder)


def _pair(name="three_blocks_l2"):
    return diffusers_pair(TINY_CONFIGS[name], seed=0)


def _count_spill_files(monkeypatch) -> collections.Counter:
    """Count the chunk files written (and check each is gone by the end)."""
    written = collections.Counter()
    real = tiling_spill.SpillStore.write

    def write(self, key, region, value):
        real(self, key, region, value)
        written[self.files[key][0]] += 1

    monkeypatch.setattr(tiling_spill.SpillStore, "write", write)
    return written


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_spilled_plan_equals_diffusers_untiled(kind, spill_dir, monkeypatch):
    ref, model = _pair()
    f = model.config.downsample_factor
    g = torch.Generator().manual_seed(1)
    if kind == "decode":
        x = torch.randn(2, model.config.latent_channels, 13, 11, generator=g)
    else:
        x = torch.rand(2, 3, 13 * f, 11 * f, generator=g) * 2 - 1
    plan = torch_tiling.exact_plan(model, x, kind, 4 * f, memory_limit=LEANEST)
    spilled = plan_exact(model.config, kind, plan.latent_hw, 2, 4, plan.grid.rows[1], LEANEST, spill=True)
    assert plan.spilled == frozenset() and plan.flops > plan.untiled_flops  # without spill: recomputation
    assert spilled.spilled and spilled.flops == pytest.approx(spilled.untiled_flops)  # spilling recomputes nothing
    assert spilled.peak_bytes < plan.peak_bytes
    written = _count_spill_files(monkeypatch)
    with torch.no_grad():
        if kind == "decode":
            expected = ref.decode(x).sample
            got = torch_tiling.tiled_decode(model, x, mode="exact", tile_sample_min_size=4 * f,
                                            memory_limit=LEANEST, spill=spill_dir)
        else:
            expected = ref.encode(x).latent_dist.parameters
            got = torch_tiling.tiled_encode(model, x, mode="exact", tile_sample_min_size=4 * f,
                                            memory_limit=LEANEST, spill=spill_dir)
    assert rel_err(got, expected) <= TOL
    assert len(written) >= 9 * len(spilled.spilled) // 2  # chunk files were really written (tiles x nodes)
    assert os.listdir(spill_dir) == []  # the temporary folder and its files are gone


def test_enable_tiling_spill_true_uses_the_system_temporary_folder(spill_dir, monkeypatch):
    _, model = _pair("two_blocks")
    monkeypatch.setattr(tiling_spill.tempfile, "gettempdir", lambda: spill_dir)
    made = []
    real_mkdtemp = tiling_spill.tempfile.mkdtemp
    monkeypatch.setattr(tiling_spill.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    z = torch.randn(1, model.config.latent_channels, 10, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.decode(z).sample
        model.enable_tiling("exact", tile_sample_min_size=3 * model.config.downsample_factor, memory_limit=LEANEST,
                            spill=True)
        got = model.decode(z).sample
    assert made and os.path.dirname(made[0]) == spill_dir and not os.path.exists(made[0])
    assert rel_err(got, expected) <= TOL


def test_spill_files_are_deleted_on_error(spill_dir, monkeypatch):
    _, model = _pair()
    f = model.config.downsample_factor
    z = torch.randn(1, model.config.latent_channels, 12, 12, generator=torch.Generator().manual_seed(3))
    calls = {"n": 0}
    real = TorchTileOps.norm_act_conv

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchTileOps, "norm_act_conv", failing)
    written = _count_spill_files(monkeypatch)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        torch_tiling.tiled_decode(model, z, mode="exact", tile_sample_min_size=4 * f, memory_limit=LEANEST,
                                  spill=spill_dir)
    assert written  # files existed when it failed
    assert os.listdir(spill_dir) == []


def test_not_enough_disk_is_a_clear_error_before_any_work(spill_dir, monkeypatch):
    _, model = _pair()
    f = model.config.downsample_factor
    z = torch.randn(1, model.config.latent_channels, 12, 12)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(tiling_spill.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    with torch.no_grad(), pytest.raises(tiling_spill.SpillSpaceError, match="GiB free") as info:
        torch_tiling.tiled_decode(model, z, mode="exact", tile_sample_min_size=4 * f, memory_limit=LEANEST,
                                  spill=spill_dir)
    assert spill_dir in str(info.value)
    assert os.listdir(spill_dir) == []


def test_enable_tiling_rejects_a_missing_spill_folder(tmp_path):
    _, model = _pair("two_blocks")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model.enable_tiling("exact", spill=str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="spill"):
        model.enable_tiling("exact", spill=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_round_trip_keeps_every_bit(dtype, spill_dir):
    ops = TorchTileOps(None, 2, dtype, torch.device("cpu"))
    x = torch.randn(2, 3, 5, 7).to(dtype)
    store = tiling_spill.SpillStore("decoder.up.0", (0, 5), (0, 3, 7), ops, spill_dir)
    store.write((0, 0), (0, 5, 0, 3), x[:, :, :, :3].contiguous())
    store.write((0, 1), (0, 5, 3, 7), x[:, :, :, 3:].contiguous())
    got = store.read((1, 4, 2, 6)).tensor((1, 4, 2, 6))
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8) if dtype != torch.float32 else got, (
        x[:, :, 1:4, 2:6].contiguous().view(torch.uint8) if dtype != torch.float32 else x[:, :, 1:4, 2:6]))
    store.release((0, 0), None)
    assert sorted(os.listdir(spill_dir)) == ["decoder_up_0-0-1.bin"]
    assert np.fromfile(os.path.join(spill_dir, "decoder_up_0-0-1.bin"), dtype=np.uint8).size == x[..., 3:].numel() * \
        x.element_size()


def test_sd_decode_at_4096_within_6_gib_without_recomputing():
    """Issue 15, item 4: the 6 GiB plan at 4096x4096 recomputed 3.7x the untiled FLOPs; spilling keeps it at 1x."""
    config = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)
    limit = 6 * 2**30
    recompute = plan_exact(config, "decode", (512, 512), 1, 4, 32, limit)
    spill = plan_exact(config, "decode", (512, 512), 1, 4, 32, limit, spill=True)
    assert recompute.flops > 3 * recompute.untiled_flops
    assert spill.peak_bytes <= limit and spill.flops <= 1.05 * spill.untiled_flops
    assert 0 < spill.spill_bytes() < 40 * 2**30
