"""Exact tiling of one input over the ranks of the default torch.distributed process group.

Every rank calls decode/encode with the same input and gets the whole output, equal to the untiled one. The
shares (which tiles each rank computes, which chunk rows it receives) are :mod:`klvae.tiling_shares`'; this
module carries them out with torch.distributed on the model's device (gloo: through host memory):

- after each pass, one ``all_gather`` of every rank's GroupNorm moments (count, mean, M2 in float64), merged in
  rank order with :meth:`~klvae.tiling_executor.GroupMoments.add` (Chan's formula), so every rank holds
  bit-identical statistics;
- then the halo rows of stored chunks, point to point (``batch_isend_irecv`` of one list every rank builds in
  the same order, so sends and receives pair up and nothing waits on a message never sent);
- whole nodes written by a pass (the attention's input, the output) are completed with one ``broadcast`` per
  rank's band;
- the mid-block attention is split by query rows: each rank attends for its band of rows against all keys
  (every rank holds the whole attention input, 1/64 of the image's pixels), and the bands are broadcast. That
  divides the attention's quadratic cost by the ranks instead of leaving the others idle while one computes.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

import torch
import torch.distributed as dist

from klvae.errors import DistributedError
from klvae.tiling_executor import ExactExecutor, WholeStore, crop
from klvae.tiling_plan import ExactPlan, GlobalStep, Pass
from klvae.tiling_shares import Rows, Shares, spread
from klvae.torch.attention import Attention
from klvae.torch.exact_tiling import TorchTileOps, run_global_module

LAUNCH_HINT = ("launch one process per rank with torchrun (torchrun --nproc-per-node N script.py) and call "
               "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (CUDA) before decoding; or use "
               "mode='exact' in a single process")


def world_size() -> int:
    """Ranks of the initialised default process group; :class:`DistributedError` saying how to launch, without."""
    if not dist.is_available():
        raise DistributedError("tiling mode 'distributed' needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        raise DistributedError(f"tiling mode 'distributed' needs an initialised default process group: {LAUNCH_HINT}")
    return dist.get_world_size()


def join_default_group(device: torch.device) -> int:
    """Initialise the default process group from torchrun's environment, unless one is (gloo for the CPU,
    NCCL for CUDA, on this rank's GPU), destroyed at exit; returns this process's rank."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return dist.get_rank()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Comm:
    """The collectives of a distributed run on the default group, for tensors on ``device``."""

    def __init__(self, device: torch.device):
        self.rank, self.world = dist.get_rank(), world_size()
        backend = str(dist.get_backend()).lower()
        if backend == "nccl" and device.type != "cuda":
            raise DistributedError(f"the process group uses NCCL, which needs CUDA tensors; the input is on {device} "
                                   "(move the model and input to this rank's GPU, or init the group with gloo)")
        self.device = device
        self.wire = torch.device("cpu") if backend == "gloo" else device  # where tensors travel

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(self.wire).contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x)
        return [t.to(self.device) for t in out]

    def exchange(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> list:
        """Send each ``(dst, tensor)`` and fill each ``(src, buffer)``; returns the received tensors (on the
        device) in ``recvs``' order. Messages between two ranks pair up in the order both list them."""
        ops = [dist.P2POp(dist.isend, t.to(self.wire).contiguous(), dst) for dst, t in sends]
        bufs = [b if self.wire == self.device else b.to(self.wire) for _, b in recvs]
        ops += [dist.P2POp(dist.irecv, b, src) for (src, _), b in zip(recvs, bufs)]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return [b.to(self.device) for b in bufs]

    def broadcast_bands(self, whole: torch.Tensor, bands: list[Rows]) -> None:
        """Complete ``whole`` (NCHW) on every rank: rank r's rows ``bands[r]`` go to all others."""
        for src, (a, b) in enumerate(bands):
            if a == b:
                continue
            band = whole[:, :, a:b]
            buf = band.to(self.wire).contiguous() if src == self.rank else \
                torch.empty(band.shape, dtype=band.dtype, device=self.wire)
            dist.broadcast(buf, src)
            if src != self.rank:
                band.copy_(buf)


def check_same_input(comm: Comm, x: torch.Tensor, what: str) -> None:
    """Every rank must be given the same input: compare shapes and a float64 sum and sum of squares."""
    xd = x.detach().double()
    local = torch.tensor([*x.shape, xd.sum().item(), xd.square().sum().item()], dtype=torch.float64)
    rows = [r.tolist() for r in comm.all_gather(local)]
    for rank, row in enumerate(rows):
        if row[:4] != rows[0][:4]:
            raise DistributedError(f"distributed tiling: rank {rank} was given {what} of shape "
                                   f"{tuple(map(int, row[:4]))}, rank 0 {tuple(map(int, rows[0][:4]))}; every rank "
                                   "must call with the same input")
        for a, b in zip(row[4:], rows[0][4:]):
            if abs(a - b) > 1e-9 * max(abs(a), abs(b), 1e-30):
                raise DistributedError(f"distributed tiling: rank {rank} was given other {what} than rank 0 (same "
                                       "shape, different values); every rank must call with the same input (seed "
                                       "random latents the same on every rank)")


class DistributedExecutor(ExactExecutor):
    """One rank's run of a (spread) plan: its tiles, then the merges and exchanges after each pass."""

    def __init__(self, plan: ExactPlan, ops: TorchTileOps, shares: Shares, comm: Comm):
        super().__init__(plan, ops)
        self.shares, self.comm = shares, comm

    def tiles(self, k, step, grid):
        return self.shares.tiles(k, self.comm.rank)

    def end_pass(self, k: int, step: Pass) -> None:
        self.merge_moments(step)
        self.exchange_chunks(k, step)
        for name in step.store:
            if name in self.plan.full:
                self.comm.broadcast_bands(self.stores[name].whole(), self.shares.written_bands(name))

    def merge_moments(self, step: Pass) -> None:
        """Gather every rank's moments of the pass's statistics and merge them in rank order."""
        if not step.stats:
            return
        batch, parts = self.plan.batch, []
        for name in step.stats:
            m = self.stats[name]
            empty = torch.zeros(batch * m.groups, dtype=torch.float64, device=self.comm.device)
            mean = empty if m.mean is None else m.mean.reshape(-1)
            m2 = empty if m.m2 is None else m.m2.reshape(-1)
            count = torch.tensor([float(m.count)], dtype=torch.float64, device=self.comm.device)
            parts.append(torch.cat([count, mean, m2]))
        gathered = self.comm.all_gather(torch.cat(parts))
        counts = [[int(c) for c in row.tolist()] for row in gathered]  # one host copy per rank
        offset = 0
        for name in step.stats:
            groups = self.stats[name].groups
            n = batch * groups
            merged = self.ops.moments(groups)
            for row, values in zip(gathered, counts):
                if values[offset]:
                    merged.add(values[offset], row[offset + 1:offset + 1 + n].view(batch, groups),
                               row[offset + 1 + n:offset + 1 + 2 * n].view(batch, groups))
            self.stats[name] = merged
            offset += 1 + 2 * n

    def exchange_chunks(self, k: int, step: Pass) -> None:
        """Send the chunk rows other ranks read, receive those this rank reads; keep only what it reads."""
        rank, pieces = self.comm.rank, self.shares.pieces(k)
        sends, recvs, received = [], [], []
        for p in pieces:
            store = self.stores[p.node]
            if p.src == rank:
                array = store.chunks[p.chunk][0]
                sends.append((p.dst, crop(array, store.held(p.chunk), (*p.rows, *p.cols), self.ops.row_axis)))
            elif p.dst == rank:
                shape = (self.plan.batch, self.graph[p.node].channels, p.rows[1] - p.rows[0], p.cols[1] - p.cols[0])
                recvs.append((p.src, torch.empty(shape, dtype=self.ops.dtype, device=self.ops.device)))
                received.append(p)
        arrays = self.comm.exchange(sends, recvs)
        for name in step.store:
            if self.shares.chunked(name):
                store, need = self.stores[name], self.shares.needs[name][rank]
                for key in list(store.chunks):
                    store.keep(key, need.get(key))
        for p, array in zip(received, arrays):
            self.stores[p.node].put(p.chunk, p.rows, array)

    def run_global(self, step: GlobalStep) -> None:
        """The attention by query rows, each rank its band, then gathered; any other module whole on every rank."""
        node = self.graph[step.node]
        x = self.stores[node.inputs[0]].whole()
        module, size = self.ops.module(node.module), self.plan.size(node.name)
        if isinstance(module, Attention):
            out = self.ops.empty(node, size)
            bands = self.shares.query_bands(node.name)
            a, b = bands[self.comm.rank]
            if b > a:
                out[:, :, a:b] = run_global_module(module, x, (a, b))
            self.comm.broadcast_bands(out, bands)
        else:
            out = run_global_module(module, x)
        self.stores[node.name] = WholeStore(out, size, self.ops)


def run_distributed(model, x: torch.Tensor, make_plan: Callable[[int | None], ExactPlan],
                    available: int | None = None) -> torch.Tensor:
    """Decode latents or encode images with an exact plan shared over the ranks of the default process group;
    every rank must pass the same ``x`` and gets the whole output. ``make_plan(available)`` gives the plan for
    the least memory ``available`` on any rank (None: unknown), so that every rank runs the same plan."""
    comm = Comm(x.device)
    least = min_over_ranks(comm, available)
    plan = make_plan(least)
    check_same_input(comm, x, "latents" if plan.graph.kind == "decode" else "images")
    plan = spread(plan, comm.world)
    shares = Shares(plan, comm.world)
    with torch.no_grad():
        return DistributedExecutor(plan, TorchTileOps(model, plan.batch, x.dtype, x.device), shares, comm).run(x)


def min_over_ranks(comm: Comm, value: int | None) -> int | None:
    """The smallest ``value`` of all ranks (None if any rank's is None)."""
    got = [int(t.item()) for t in comm.all_gather(torch.tensor([-1 if value is None else value], dtype=torch.int64))]
    return None if min(got) < 0 else min(got)


__all__ = ["Comm", "DistributedExecutor", "LAUNCH_HINT", "check_same_input", "join_default_group", "min_over_ranks",
           "run_distributed", "world_size"]
