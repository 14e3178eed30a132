"""How the ranks of a distributed run share an exact plan, and what they exchange (no torch, no jax).

Every rank runs the same :class:`~klvae.tiling_plan.ExactPlan` on the same input. In each pass a rank computes
the tiles of one contiguous band of tile rows (rank ``r`` of ``N`` gets rows ``r * R // N`` to
``(r + 1) * R // N`` of the pass's ``R`` tile rows; a rank may get none), so the halos its tiles read from
stored nodes cross only the band's upper and lower edges. After a pass:

- GroupNorm moments: every rank's (count, mean, M2) per stored statistic, gathered and merged in rank order.
- Stored nodes kept in chunks: each rank receives, from the chunks' owners, the rows of the chunks its own tiles
  will read in later passes (:attr:`Shares.needs`: per chunk, the smallest row range covering every read; all
  of the chunk's columns, since a band spans the image's width), and keeps only those of its own chunks.
- Whole nodes (the attention's input, the output): every rank's band is sent to every other rank.

The global step (the mid-block attention) is split by query rows: rank ``r`` attends for the rows
``r * h // N`` to ``(r + 1) * h // N`` of the latent, against all keys, and the bands are gathered.

:func:`spread` cuts the plan's coarse low-resolution passes into at least ``N`` tile rows (where the latent has
that many), so that every rank has work in every pass; tile sizes change only speed and memory, never the result.
:func:`volume` counts the bytes and collectives the exchange needs, from the plan alone.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

from klvae.tiling_plan import ExactPlan, Pass, TileGrid, split_evenly

Rows = tuple[int, int]
Chunk = tuple[int, int]


def bands(count: int, world: int) -> list[Rows]:
    """Contiguous near-equal shares of ``count`` items over ``world`` ranks: rank r gets items a:b of ``[(a, b)]``."""
    return [(r * count // world, (r + 1) * count // world) for r in range(world)]


def spread(plan: ExactPlan, world: int) -> ExactPlan:
    """``plan`` with each pass's tile rows cut into the next multiple of ``world`` (at most one per latent row)
    where their count is not one, so that the ranks share every pass evenly (the coarse low-resolution passes
    included). The result is the same whatever the tiles."""
    if world < 1:
        raise ValueError(f"a distributed run needs at least one rank, got {world}")
    height = plan.latent_hw[0]

    def spread_grid(grid: TileGrid | None) -> TileGrid | None:
        if grid is None or grid.shape[0] % world == 0 or grid.shape[0] >= height:
            return grid
        rows = min(height, world * math.ceil(grid.shape[0] / world))
        return TileGrid(split_evenly(height, rows), grid.cols)

    return dataclasses.replace(plan, grids=tuple(spread_grid(g) for g in plan.grids))


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``rows`` (the node's pixels; columns ``cols``, the whole chunk) of chunk ``chunk`` of the stored node
    ``node``, sent from rank ``src`` to rank ``dst`` after pass ``step``."""

    step: int
    node: str
    chunk: Chunk
    rows: Rows
    cols: Rows
    src: int
    dst: int
    nbytes: int


class Shares:
    """The tiles of each rank and the chunks the ranks exchange, for ``plan`` run on ``world`` ranks."""

    def __init__(self, plan: ExactPlan, world: int):
        if world < 1:
            raise ValueError(f"a distributed run needs at least one rank, got {world}")
        self.plan, self.world = plan, world
        self.row_bands = {k: bands(grid.shape[0], world) for k, grid in enumerate(plan.grids) if grid is not None}
        self.producer = {name: k for k, step in enumerate(plan.steps) if isinstance(step, Pass)
                         for name in step.store}
        self.needs = self._needs()

    # ------------------------------------------------------------------ tiles
    def tiles(self, k: int, rank: int) -> list[tuple[int, int]]:
        """The tiles of pass ``k`` rank ``rank`` computes, in raster order."""
        a, b = self.row_bands[k][rank]
        return [(i, j) for i in range(a, b) for j in range(self.plan.grids[k].shape[1])]

    def owner(self, k: int, i: int) -> int:
        """The rank that computes tile row ``i`` of pass ``k``."""
        return next(r for r, (a, b) in enumerate(self.row_bands[k]) if a <= i < b)

    def owned_rows(self, k: int, rank: int, scale: int) -> Rows:
        """The rows (pixels at ``scale``) rank ``rank``'s tiles of pass ``k`` own; empty ``(a, a)`` for none."""
        a, b = self.row_bands[k][rank]
        rows = self.plan.grids[k].rows
        return rows[a] * scale, rows[b] * scale

    def written_bands(self, name: str) -> list[Rows]:
        """Each rank's rows of the whole node ``name`` written tile by tile in a pass."""
        k, scale = self.producer[name], self.plan.graph[name].scale
        return [self.owned_rows(k, r, scale) for r in range(self.world)]

    def query_bands(self, name: str) -> list[Rows]:
        """Each rank's query rows of the global node ``name`` (the attention), in the node's pixels."""
        return bands(self.plan.size(name)[0], self.world)

    # ------------------------------------------------------------------ stored chunks
    def chunk_rows(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The chunk boundaries (rows, columns; the node's pixels) of the chunked node ``name``."""
        grid, scale = self.plan.grids[self.producer[name]], self.plan.graph[name].scale
        return tuple(r * scale for r in grid.rows), tuple(c * scale for c in grid.cols)

    def chunked(self, name: str) -> bool:
        return name in self.producer and name not in self.plan.full

    def _needs(self) -> dict[str, list[dict[Chunk, Rows]]]:
        """For each chunked node and rank: the rows of each chunk the rank's tiles read in later passes."""
        plan = self.plan
        needs = {name: [{} for _ in range(self.world)] for name in self.producer if self.chunked(name)}
        for k, step in enumerate(plan.steps):
            if not isinstance(step, Pass):
                continue
            read = [n for n in step.reads if n in needs]
            for rank in range(self.world):
                for i, j in self.tiles(k, rank):
                    regions = plan.regions(step, i, j, plan.grids[k])
                    for name in read:
                        _cover(needs[name][rank], regions[name], *self.chunk_rows(name))
        return needs

    def pieces(self, k: int) -> list[Piece]:
        """What the ranks send each other after pass ``k``, in one order every rank agrees on."""
        step, out = self.plan.steps[k], []
        if not isinstance(step, Pass):
            return out
        for name in step.store:
            if not self.chunked(name):
                continue
            _, cols = self.chunk_rows(name)
            per_pixel = self.plan.batch * self.plan.graph[name].channels * self.plan.itemsize
            for dst in range(self.world):
                for chunk, rows in sorted(self.needs[name][dst].items()):
                    src = self.owner(k, chunk[0])
                    if src != dst:
                        c = (cols[chunk[1]], cols[chunk[1] + 1])
                        out.append(Piece(k, name, chunk, rows, c, src, dst,
                                         per_pixel * (rows[1] - rows[0]) * (c[1] - c[0])))
        return out


def _cover(need: dict[Chunk, Rows], region: tuple[int, int, int, int], rows: tuple[int, ...],
           cols: tuple[int, ...]) -> None:
    """Grow ``need`` (chunk -> row range) to cover ``region`` of a node chunked at ``rows`` x ``cols``."""
    r0, r1, c0, c1 = region
    for i in range(bisect.bisect_right(rows, r0) - 1, bisect.bisect_left(rows, r1)):
        a, b = max(r0, rows[i]), min(r1, rows[i + 1])
        for j in range(bisect.bisect_right(cols, c0) - 1, bisect.bisect_left(cols, c1)):
            old = need.get((i, j))
            need[i, j] = (a, b) if old is None else (min(old[0], a), max(old[1], b))


# ---------------------------------------------------------------------------------------------- volume
def moments_bytes(plan: ExactPlan, step: Pass) -> int:
    """Bytes one rank contributes to pass ``step``'s gather of GroupNorm moments: per statistic, the count, and
    the mean and M2 per (batch, group), in float64."""
    groups = {n.inputs[0]: n.groups for n in plan.graph.nodes if n.groups}
    return sum(8 * (1 + 2 * plan.batch * groups[name]) for name in step.stats)


def volume(plan: ExactPlan, world: int) -> dict:
    """The communication of running ``plan`` (already :func:`spread`) on ``world`` ranks: halo pieces
    point-to-point, gathers of GroupNorm moments (one per pass with statistics), and the bands of the whole
    nodes (the attention's input and output, the output) sent to every rank. Bytes are totals over all ranks
    unless named ``per_rank`` (the most any one rank receives)."""
    shares = Shares(plan, world)
    received = [0] * world
    halo_bytes = halo_messages = 0
    gathers = gather_bytes = 0
    whole = []  # (name, bytes of the node)
    for k, step in enumerate(plan.steps):
        if isinstance(step, Pass):
            for piece in shares.pieces(k):
                halo_bytes += piece.nbytes
                halo_messages += 1
                received[piece.dst] += piece.nbytes
            if step.stats:
                gathers += 1
                gather_bytes += world * moments_bytes(plan, step)
            whole += [(n, plan.nbytes(n)) for n in step.store if n in plan.full]
        else:
            whole.append((step.node, plan.nbytes(step.node)))
    per_rank_whole = [0] * world
    for name, nbytes in whole:
        bands_ = shares.query_bands(name) if name not in shares.producer else shares.written_bands(name)
        height = plan.size(name)[0]
        for r, (a, b) in enumerate(bands_):
            per_rank_whole[r] += nbytes - nbytes * (b - a) // height
    return dict(world=world, halo_bytes=halo_bytes, halo_messages=halo_messages,
                halo_bytes_per_rank=max(received), moment_gathers=gathers, moment_bytes=gather_bytes,
                whole_nodes=len(whole), whole_bytes=(world - 1) * sum(b for _, b in whole),
                whole_bytes_per_rank=max(per_rank_whole),
                stored_bytes=sum(plan.nbytes(n) for n in shares.producer if shares.chunked(n)))


def rank_flops(plan: ExactPlan, world: int) -> list[float]:
    """Estimated floating-point operations of each rank's tiles (halos and recomputation included; the global
    step not counted), from the nodes each pass computes over each tile's rectangles."""
    shares, out = Shares(plan, world), [0.0] * world
    for k, step in enumerate(plan.steps):
        if not isinstance(step, Pass):
            continue
        computed = [n for n in step.closure if not (n in plan.stored and n not in step.store)]
        for rank in range(world):
            for i, j in shares.tiles(k, rank):
                regions = plan.regions(step, i, j, plan.grids[k])
                for name in computed:
                    r0, r1, c0, c1 = regions[name]
                    out[rank] += plan.graph[name].flops * plan.batch * (r1 - r0) * (c1 - c0)
    return out


__all__ = ["Piece", "Shares", "bands", "moments_bytes", "rank_flops", "spread", "volume"]
