"""Distributed exact tiling: 2 gloo ranks (spawned processes) share each plan's tiles and every rank gets the
untiled result (klvae's and diffusers'); the share and exchange plan by hand; 1 rank; errors; the CLI under
torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae
from klvae.errors import DistributedError
from klvae.tiling_plan import TileGrid, plan_exact
from klvae.tiling_shares import Shares, _cover, bands, rank_flops, spread, volume

TOL = 1e-5
WORLD = 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name: (config, kind, input shape, tile_sample_min_size). Tiles of 1-4 latent pixels make many tiles.
CASES = {
    "decode_batch2_odd": ("two_blocks", "decode", (2, 4, 13, 11), 8),
    "decode_l2_gelu": ("three_blocks_l2", "decode", (1, 4, 9, 7), 16),
    "encode_batch2_odd": ("two_blocks", "encode", (2, 3, 26, 22), 8),
    "encode_l2_gelu": ("three_blocks_l2", "encode", (1, 3, 36, 28), 16),
    "decode_uneven_3_rows": ("two_blocks", "decode", (1, 4, 3, 7), 2),   # 3 tile rows: bands of 1 and 2
    "decode_one_row_idle_rank": ("two_blocks", "decode", (2, 4, 1, 9), 2),  # rank 1 has no tiles at all
    "decode_one_tile": ("two_blocks", "decode", (1, 4, 5, 6), 512),  # the exact plan's single tile, split
}


def _input(case: str) -> torch.Tensor:
    _, _, shape, _ = CASES[case]
    x = torch.randn(shape, generator=_gen(sorted(CASES).index(case)))
    return x.clamp(-1, 1) if CASES[case][1] == "encode" else x


def _run(model, kind: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(x).sample if kind == "decode" else model.encode(x).latent_dist.parameters


def _worker(rank: int, store: str, folder: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        models = {}
        for case in cases:
            config, kind, _, tile = CASES[case]
            if config not in models:
                models[config] = klvae.AutoencoderKL(**TINY_CONFIGS[config]).eval()
                models[config].load_state_dict(torch.load(os.path.join(folder, f"{config}.pt")))
            model = models[config]
            model.enable_tiling("distributed", tile_sample_min_size=tile)
            torch.save(_run(model, kind, _input(case)), os.path.join(folder, f"{case}.{rank}.pt"))
        # Different latents on the two ranks: every rank refuses.
        z = torch.randn(1, 4, 6, 6, generator=_gen(rank))
        try:
            models["two_blocks"].decode(z)
        except DistributedError as e:
            with open(os.path.join(folder, f"mismatch.{rank}.txt"), "w") as f:
                f.write(str(e))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pairs():
    return {name: diffusers_pair(TINY_CONFIGS[name], seed=3) for name in ("two_blocks", "three_blocks_l2")}


@pytest.fixture(scope="module")
def ranks(pairs, tmp_path_factory):
    """Every case run once on 2 spawned gloo ranks; returns the folder with each rank's outputs."""
    folder = tmp_path_factory.mktemp("ranks")
    for name, (_, ours) in pairs.items():
        torch.save(ours.state_dict(), folder / f"{name}.pt")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder), sorted(CASES)), nprocs=WORLD, join=True)
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_gets_the_untiled_result(case, ranks, pairs):
    config, kind, _, _ = CASES[case]
    theirs, ours = pairs[config]
    x = _input(case)
    outs = [torch.load(ranks / f"{case}.{r}.pt") for r in range(WORLD)]
    assert torch.equal(outs[0], outs[1])  # the whole result, bit for bit the same on every rank
    assert rel_err(outs[0], _run(ours, kind, x)) <= TOL
    with torch.no_grad():
        oracle = theirs.decode(x).sample if kind == "decode" else theirs.encode(x).latent_dist.parameters
    assert rel_err(outs[0], oracle) <= TOL


def test_ranks_given_different_inputs_refuse(ranks):
    for r in range(WORLD):
        text = (ranks / f"mismatch.{r}.txt").read_text()
        assert "rank 1 was given other latents than rank 0" in text


def test_without_a_process_group_the_error_says_how_to_launch(pairs):
    model = pairs["two_blocks"][1]
    model.enable_tiling("distributed")
    try:
        with pytest.raises(DistributedError, match="torchrun"):
            model.decode(torch.zeros(1, 4, 4, 4))
    finally:
        model.disable_tiling()


def test_each_backend_lists_only_its_own_multi_device_mode():
    from klvae.flax.tiling import MODES as FLAX_MODES
    from klvae.tiling import ALL_MODES
    from klvae.torch.tiling import MODES

    assert "distributed" in MODES and "sharded" not in MODES
    assert "sharded" in FLAX_MODES and "distributed" not in FLAX_MODES
    assert not {"distributed", "sharded"} & set(ALL_MODES)


def test_one_rank_is_exact_tiling(pairs, tmp_path):
    _, model = pairs["two_blocks"]
    z = torch.randn(2, 4, 13, 11, generator=_gen(5))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model.enable_tiling("distributed", tile_sample_min_size=8)
        got = _run(model, "decode", z)
    finally:
        dist.destroy_process_group()
    model.enable_tiling("exact", tile_sample_min_size=8)
    try:
        assert torch.equal(got, _run(model, "decode", z))
    finally:
        model.disable_tiling()


# ---------------------------------------------------------------------------------------------- the shares
def test_bands_are_contiguous_and_may_be_empty():
    assert bands(5, 2) == [(0, 2), (2, 5)]
    assert bands(1, 2) == [(0, 0), (0, 1)]
    assert bands(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_cover_takes_the_rows_each_chunk_is_read_at():
    need = {}
    # chunks: rows 0:4, 4:8; cols 0:3, 3:6. A read of rows 3:5, cols 2:4 touches all four chunks.
    _cover(need, (3, 5, 2, 4), (0, 4, 8), (0, 3, 6))
    assert need == {(0, 0): (3, 4), (0, 1): (3, 4), (1, 0): (4, 5), (1, 1): (4, 5)}
    _cover(need, (6, 8, 0, 1), (0, 4, 8), (0, 3, 6))
    assert need[1, 0] == (4, 8) and need[1, 1] == (4, 5)


def _tiny_plan(latent_hw, tile):
    config = klvae.AutoencoderKL.config_class(**TINY_CONFIGS["two_blocks"])
    return plan_exact(config, "decode", latent_hw, 1, 4, tile)


def test_spread_gives_every_rank_rows_in_every_pass():
    plan = _tiny_plan((8, 6), 2)  # scale-2 passes: 4 tile rows; scale-1 passes: 2
    assert {g.shape[0] for g in plan.grids if g is not None} == {2, 4}
    assert {g.shape[0] for g in spread(plan, 4).grids if g is not None} == {4}
    assert {g.shape[0] for g in spread(plan, 3).grids if g is not None} == {3, 6}  # the next multiples of 3
    assert spread(plan, 2) == plan
    assert {g.shape[0] for g in spread(_tiny_plan((3, 6), 2), 4).grids if g is not None} == {3}  # one per row


def test_halo_pieces_by_hand():
    """Latent 4x2 in 1-latent tiles, two_blocks decoder (f = 2): passes at latent scale have tile rows 0:2 and
    2:4 (rank 0 and rank 1). decoder.conv_in is stored by the first pass and read by the mid-block's first
    GroupNorm+conv (3x3: one halo row) in the next: rank 1 needs conv_in's row 1 from rank 0, rank 0 its row 2
    from rank 1, in every chunk column."""
    plan = spread(_tiny_plan((4, 2), 1), 2)
    shares = Shares(plan, 2)
    k = shares.producer["decoder.conv_in"]
    assert plan.grids[k] == TileGrid((0, 2, 4), (0, 2))
    assert shares.tiles(k, 0) == [(0, 0)] and shares.tiles(k, 1) == [(1, 0)]
    sent = [(p.node, p.chunk, p.rows, p.cols, p.src, p.dst) for p in shares.pieces(k)]
    assert sent == [("decoder.conv_in", (1, 0), (2, 3), (0, 2), 1, 0),
                    ("decoder.conv_in", (0, 0), (1, 2), (0, 2), 0, 1)]
    # what each rank keeps of conv_in: its own band plus that halo row
    assert shares.needs["decoder.conv_in"] == [{(0, 0): (0, 2), (1, 0): (2, 3)}, {(0, 0): (1, 2), (1, 0): (2, 4)}]
    channels = plan.graph["decoder.conv_in"].channels
    assert [p.nbytes for p in shares.pieces(k)] == [channels * 1 * 2 * 4] * 2


def test_every_read_is_covered_and_nothing_more_is_kept():
    """Brute force: each rank's needs are exactly the rows its tiles' regions touch, per chunk."""
    plan = spread(_tiny_plan((7, 5), 1), 2)
    shares = Shares(plan, 2)
    for name, per_rank in shares.needs.items():
        rows, cols = shares.chunk_rows(name)
        for rank, need in enumerate(per_rank):
            touched = {}
            for k, step in enumerate(plan.steps):
                if plan.grids[k] is None or name not in step.reads:
                    continue
                for i, j in shares.tiles(k, rank):
                    r0, r1, c0, c1 = plan.regions(step, i, j, plan.grids[k])[name]
                    for r in range(r0, r1):
                        ci = max(n for n in range(len(rows) - 1) if rows[n] <= r)
                        for cj in range(len(cols) - 1):
                            if cols[cj] < c1 and c0 < cols[cj + 1]:
                                touched.setdefault((ci, cj), set()).add(r)
            assert {key: (min(v), max(v) + 1) for key, v in touched.items()} == need


def test_volume_counts_halos_moments_and_whole_nodes():
    plan = spread(_tiny_plan((4, 2), 1), 2)
    v = volume(plan, 2)
    shares = Shares(plan, 2)
    assert v["halo_bytes"] == sum(p.nbytes for k in range(len(plan.steps)) for p in shares.pieces(k))
    assert v["moment_gathers"] == sum(1 for s in plan.steps if getattr(s, "stats", ()))
    whole = plan.nbytes(plan.graph.output) + 2 * plan.nbytes("decoder.mid_block.attentions.0")  # attn in and out
    assert v["whole_bytes"] == whole
    assert volume(plan, 1)["halo_bytes"] == 0
    # arithmetic: two ranks do all of one rank's (their halos overlap a little), each about half
    one, two = sum(rank_flops(plan, 1)), rank_flops(plan, 2)
    assert one <= sum(two) <= 1.5 * one and max(two) < 0.8 * one


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_under_torchrun_writes_one_output_equal_to_untiled(tmp_path, pairs, capsys):
    _, model = pairs["three_blocks_l2"]
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    from klvae.latentfile import write_latents

    z = torch.randn(1, 4, 9, 7, generator=_gen(11))
    write_latents(str(tmp_path / "z.safetensors"), {"latents": z.numpy()}, {})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m",
           "klvae.cli", "decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "out"), "-m", str(folder),
           "--tiling", "distributed", "--bits", "16", "-q"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["z.png"]
    from klvae.cli import main

    assert main(["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "single"), "-m", str(folder),
                 "--bits", "16", "-q"]) == 0
    from klvae.images import read_image

    got, want = read_image(str(tmp_path / "out" / "z.png")), read_image(str(tmp_path / "single" / "z.png"))
    # without torchrun: a one-line error that says how to launch, and nothing written
    assert main(["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "none"), "-m", str(folder),
                 "--tiling", "distributed", "-q"]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err and not (tmp_path / "none").exists()
    levels = abs((got.pixels.astype("float64") * 65535).round() - (want.pixels.astype("float64") * 65535).round())
    assert levels.max() <= 1  # 16-bit levels: rounding may differ by one where the two differ by ~1e-6


@pytest.mark.slow
def test_cli_roundtrip_under_torchrun_prints_one_table_and_writes_once(tmp_path, pairs):
    _, model = pairs["three_blocks_l2"]
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["roundtrip", "-m", str(folder), "--json", "-q"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m",
           "klvae.cli", *args, "-o", str(tmp_path / "out"), "--tiling", "distributed"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "klvae.cli", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    import json

    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    want = [json.loads(line) for line in single.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["psnr"] == pytest.approx(want[0]["psnr"], abs=0.01)
    assert sorted(os.listdir(tmp_path / "out")) == ["chelsea-compare.png", "chelsea.png"]
