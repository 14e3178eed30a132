"""The backend-neutral exact-tiling executor: its hooks carry a distributed run (ranks computing a share of the
tiles each, merging GroupNorm moments and exchanging stored chunks after every pass) to the untiled result."""

from __future__ import annotations

import threading

import torch
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae.torch.tiling as torch_tiling
from klvae.tiling_executor import ExactExecutor
from klvae.torch.exact_tiling import TorchTileOps
from klvae.torch.groupnorm_stats import GroupNormStats

TOL = 1e-4


class _ChunkedTorchOps(TorchTileOps):
    in_place = False  # every stored node in chunks, so ranks can exchange them


class _Rank(ExactExecutor):
    """One rank of a simulated distributed run: threads stand in for processes, a shared board for the
    all-gather."""

    def __init__(self, plan, ops, rank: int, world: int, board: list, barrier: threading.Barrier):
        super().__init__(plan, ops)
        self.rank, self.world, self.board, self.barrier = rank, world, board, barrier

    def tiles(self, k, step, grid):
        return grid.tiles()[self.rank::self.world]

    def end_pass(self, k, step):
        self.board[self.rank] = ({n: self.stats[n] for n in step.stats},
                                 {n: dict(self.stores[n].chunks) for n in step.store})
        self.barrier.wait()
        shares = list(self.board)
        self.barrier.wait()
        for name in step.stats:  # the same merge, in rank order, on every rank
            merged = self.ops.moments(self.stats[name].groups)
            for stats, _ in shares:
                merged.merge(stats[name])
            self.stats[name] = merged
        for name in step.store:
            for _, chunks in shares:
                self.stores[name].chunks.update(chunks[name])


def test_ranks_sharing_the_tiles_give_the_untiled_result():
    model = diffusers_pair(TINY_CONFIGS["two_blocks"])[1]
    z = torch.randn(2, 4, 13, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model._decode_latents(z)
        plan = torch_tiling.exact_plan(model, z, "decode", 8)
        assert plan.grid.count >= 4
        world, board, barrier, outputs = 2, [None, None], threading.Barrier(2), [None, None]

        def run(rank: int) -> None:
            with torch.no_grad():
                ops = _ChunkedTorchOps(model, plan.batch, z.dtype, z.device)
                outputs[rank] = _Rank(plan, ops, rank, world, board, barrier).run(z)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.equal(outputs[0], outputs[1])
    assert rel_err(outputs[0], expected) <= TOL


def test_merged_moments_equal_one_accumulator():
    x = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one, left, right = GroupNormStats(4), GroupNormStats(4), GroupNormStats(4)
    one.update(x[..., :4])
    one.update(x[..., 4:])
    left.update(x[..., :4])
    right.update(x[..., 4:])
    left.merge(right)
    assert left.count == one.count
    assert torch.allclose(left.mean, one.mean, rtol=1e-14, atol=0)
    assert torch.allclose(left.variance(), one.variance(), rtol=1e-12, atol=0)
