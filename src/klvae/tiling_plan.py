"""The exact tiling plan: tile grid, which activations to keep, the passes over the tiles (no torch, no jax).

Exact tiling computes what the untiled model computes. Between two GroupNorms every operation is local, so a
tile plus a halo (the convolutions' receptive field back to the nearest kept activation) gives exact values;
each GroupNorm needs the statistics of its whole input, so the tiles run in *passes*: a pass sweeps the tiles
in raster order and computes some nodes (see :mod:`klvae.tiling_graph`) over each tile's own rectangle, keeping
("storing") some of them and accumulating the GroupNorm statistics of others. A node whose statistics come out
of one pass can be normalised only in a later pass.

A node is either *stored* (written tile by tile, read by later passes, freed chunk by chunk during its last
reading pass) or *recomputed* inside every pass that needs it, from the nearest stored nodes. Storing
everything is fastest; recomputing trades time for memory. :func:`plan_exact` starts from "store all" and
recomputes nodes, greedily, where that lowers the estimated peak memory most per extra FLOP, until the
estimate fits ``memory_limit``. With ``spill``, stored nodes may instead be *spilled*: their chunks go to files
(:mod:`klvae.tiling_spill`), outside the process's memory, and each tile reads back only the rectangle it needs;
spilling costs file traffic instead of FLOPs, so it is tried first. The mid-block attention (a GLOBAL node) runs
once on the whole latent.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from klvae.config import AutoencoderKLConfig
from klvae.tiling_graph import (ADD, CONV, DOWN_CONV, GLOBAL, INPUT, NORM_ACT_CONV, UP_CONV, Graph, Node, Region,
                                bbox, decoder_graph, encoder_graph, input_region, node_size)

# Working memory of the global attention step, in multiples of its input (normalised x, q, k, v, output).
_GLOBAL_TRANSIENT = 5.0
# Per-tile working memory, in multiples of the largest per-tile operation's new tensors (for conv(act(norm(x))):
# the normalised, padded copy of the input and the output; for upsample+conv: the upsampled copy and the output).
_TILE_TRANSIENT = 1.25
# Untiled eager runs hold more than the tensors the graph names (library workspaces, layout copies): measured
# on CPU, fp32, SD config, the peak was 1.28x the tensor count at 512x512 decode (986 MiB vs 768 MiB).
UNTILED_OVERHEAD = 1.3


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tile boundaries in latent pixels: tile (i, j) owns rows rows[i]:rows[i+1] and cols cols[j]:cols[j+1]."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows) - 1, len(self.cols) - 1

    @property
    def count(self) -> int:
        return self.shape[0] * self.shape[1]

    def tiles(self) -> list[tuple[int, int]]:
        """(i, j) in raster order."""
        return [(i, j) for i in range(self.shape[0]) for j in range(self.shape[1])]

    def owned(self, i: int, j: int, scale: int) -> Region:
        return self.rows[i] * scale, self.rows[i + 1] * scale, self.cols[j] * scale, self.cols[j + 1] * scale


def pass_tile_latents(tile_latents: int, max_scale: int, scale: int) -> int:
    """Tiles of a pass whose largest nodes are at ``scale``: the same size in those nodes' pixels as the full-
    resolution tiles (``tile_latents`` latents at ``max_scale``), so low-resolution passes run few, large tiles."""
    return tile_latents * max(1, max_scale // scale)


def pass_scale(graph: Graph, step: "Pass") -> int:
    return max(graph[name].scale for name in step.closure)


def split_evenly(length: int, parts: int) -> tuple[int, ...]:
    """Boundaries of ``parts`` near-equal pieces of ``0:length``."""
    return tuple(round(k * length / parts) for k in range(parts + 1))


def make_grid(latent_hw: tuple[int, int], tile_latents: int) -> TileGrid:
    """Split each axis into ``ceil(length / tile_latents)`` near-equal tiles."""
    if tile_latents < 1:
        raise ValueError(f"tiles must be at least one latent pixel, got {tile_latents}")

    def split(length: int) -> tuple[int, ...]:
        return split_evenly(length, max(1, math.ceil(length / tile_latents)))

    return TileGrid(split(latent_hw[0]), split(latent_hw[1]))


@dataclasses.dataclass(frozen=True)
class Pass:
    """One sweep over the tiles. ``closure`` lists, in execution order, the nodes computed per tile (targets and
    the recomputed nodes they need); ``reads`` the stored nodes it reads."""

    targets: tuple[str, ...]
    store: tuple[str, ...]   # targets written to storage
    stats: tuple[str, ...]   # targets whose GroupNorm statistics are accumulated
    closure: tuple[str, ...]
    reads: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GlobalStep:
    """Run ``node``'s module on its whole (stored) input."""

    node: str


Step = Pass | GlobalStep


@dataclasses.dataclass(frozen=True)
class ExactPlan:
    graph: Graph
    latent_hw: tuple[int, int]
    batch: int
    itemsize: int
    grid: TileGrid           # the tiles of the full-resolution passes (one tile: no tiling at all)
    grids: tuple             # the tiles of each step (None for a GlobalStep)
    stored: frozenset[str]   # nodes kept between passes (includes ``full``)
    full: frozenset[str]     # stored as one whole tensor: input, output, the attention's input and output
    steps: tuple[Step, ...]
    last_read: dict          # stored node -> index of the last step that reads it
    peak_bytes: int          # estimated peak of activation memory
    flops: float             # estimated floating-point operations (tiles, halos and recomputation included)
    untiled_peak_bytes: int  # estimated peak of the same computation untiled (tensors only, no overhead)
    untiled_flops: float
    spilled: frozenset[str] = frozenset()  # stored nodes kept in spill files instead of memory

    def spill_bytes(self) -> int:
        """Peak bytes of the spill files alive at once (each spilled node lives from its pass to its last read)."""
        produced = {name: k for k, step in enumerate(self.steps) if isinstance(step, Pass) for name in step.store}
        return max((sum(self.nbytes(n) for n in self.spilled if produced[n] <= k <= self.last_read.get(n, k))
                    for k in range(len(self.steps))), default=0)

    def size(self, name: str) -> tuple[int, int]:
        return node_size(self.graph[name], self.latent_hw)

    def nbytes(self, name: str) -> int:
        h, w = self.size(name)
        return self.batch * self.graph[name].channels * h * w * self.itemsize

    def grid_of(self, step: Pass) -> TileGrid:
        return self.grids[self.steps.index(step)]

    def regions(self, step: Pass, i: int, j: int, grid: TileGrid | None = None) -> dict[str, Region]:
        """The rectangle of every node in ``step.closure`` that tile (i, j) of the step's grid needs, targets'
        own tiles included."""
        graph = self.graph
        grid = grid or self.grid_of(step)
        need: dict[str, Region | None] = {name: None for name in step.closure}
        for t in step.targets:
            need[t] = bbox(need[t], grid.owned(i, j, graph[t].scale))
        for name in reversed(step.closure):
            node = graph[name]
            if name in self.stored and name not in step.store:
                continue  # read from storage
            for src in node.inputs:
                need[src] = bbox(need[src], input_region(node, need[name], self.size(src)))
        return need

    def max_tile_elements(self) -> int:
        """Elements of the largest per-tile tensor of any pass (the upsampled copy included), to check against
        32-bit indexing limits. Checks the tallest and widest tiles, inside and at the edges."""
        def candidates(bounds: tuple[int, ...]) -> set[int]:
            sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            inner = range(1, len(sizes) - 1) or range(len(sizes))
            return {0, len(sizes) - 1, max(inner, key=lambda k: sizes[k])}

        worst = 0
        for step, grid in zip(self.steps, self.grids):
            if not isinstance(step, Pass):
                continue
            for i in candidates(grid.rows):
                for j in candidates(grid.cols):
                    worst = max(worst, self._tile_elements(step, grid, i, j))
        return worst

    def _tile_elements(self, step: Pass, grid: TileGrid, i: int, j: int) -> int:
        worst = 0
        for name, (r0, r1, c0, c1) in self.regions(step, i, j, grid).items():
            node = self.graph[name]
            channels, pad = node.channels, 0
            if node.op == UP_CONV:  # the nearest-upsampled input, before its convolution
                channels, pad = max(channels, self.graph[node.inputs[0]].channels), 4
            worst = max(worst, self.batch * channels * (r1 - r0 + pad) * (c1 - c0 + pad))
        return worst


# ---------------------------------------------------------------------------------------------- scheduling
def _closure(graph: Graph, target: str, stored: frozenset[str]) -> tuple[set[str], set[str], set[str]]:
    """(nodes computed per tile for ``target``, stored nodes read, nodes whose statistics are needed)."""
    computed, reads, stats = set(), set(), set()
    todo = [target]
    while todo:
        name = todo.pop()
        node = graph[name]
        if name != target and name in stored or node.op in (INPUT, GLOBAL):
            reads.add(name)
            continue
        if name in computed:
            continue
        computed.add(name)
        if node.op == NORM_ACT_CONV:
            stats.add(node.inputs[0])
        todo.extend(node.inputs)
    return computed, reads, stats


def full_nodes(graph: Graph) -> frozenset[str]:
    """Nodes held as whole tensors: the input, the output, and the input and output of every GLOBAL node."""
    names = {graph.input, graph.output}
    for n in graph.nodes:
        if n.op == GLOBAL:
            names.update((n.name, n.inputs[0]))
    return frozenset(names)


def schedule(graph: Graph, stored: frozenset[str]) -> tuple[Step, ...]:
    """Group the stored and barrier nodes into passes, in execution order; a node starts a new pass when it
    reads a node stored, or needs statistics accumulated, by the pass being built."""
    barriers = graph.barriers
    steps: list[Step] = []
    current: dict | None = None

    def close() -> None:
        nonlocal current
        if current is not None:
            order = sorted(current["closure"] | current["reads"], key=graph.index)
            steps.append(Pass(tuple(current["targets"]), tuple(current["store"]), tuple(current["stats"]),
                              tuple(order), tuple(sorted(current["reads"], key=graph.index))))
        current = None

    for node in graph.nodes:
        name = node.name
        if node.op == GLOBAL:
            close()
            steps.append(GlobalStep(name))
        writes = name in stored and node.op not in (INPUT, GLOBAL)
        if not (writes or name in barriers):
            continue
        if name in stored and not writes:  # statistics of a node that is already whole (an attention output)
            computed, reads, needs = set(), {name}, set()
        else:
            computed, reads, needs = _closure(graph, name, stored)
        if current is not None and (reads & current["written"] or needs & current["measured"]):
            close()
        if current is None:
            current = dict(targets=[], store=[], stats=[], closure=set(), reads=set(), written=set(),
                           measured=set())
        current["targets"].append(name)
        current["closure"] |= computed
        current["reads"] |= reads
        if writes:
            current["store"].append(name)
            current["written"].add(name)
        if name in barriers:
            current["stats"].append(name)
            current["measured"].add(name)
    close()
    return tuple(steps)


def last_reads(graph: Graph, steps: tuple[Step, ...]) -> dict[str, int]:
    last: dict[str, int] = {}
    for k, step in enumerate(steps):
        names = (graph[step.node].inputs[0],) if isinstance(step, GlobalStep) else step.reads
        for name in names:
            last[name] = k
    return last


# ---------------------------------------------------------------------------------------------- estimates
def _margins(graph: Graph, step: Pass, stored: frozenset[str]) -> dict[str, int]:
    """Pixels by which each node of the pass is computed beyond its tile, on each side (clipping ignored)."""
    margin = {t: 0 for t in step.targets}
    for name in reversed(step.closure):
        if name in stored and name not in step.store:
            continue
        node, m = graph[name], margin.get(name, 0)
        if node.op == UP_CONV:
            src_m = (m + 2) // 2
        elif node.op == DOWN_CONV:
            src_m = 2 * m + 1
        else:
            src_m = m + node.halo
        for src in node.inputs:
            margin[src] = max(margin.get(src, 0), src_m)
    return margin


def _tiled_area(grid: TileGrid, scale: int, margin: int, size: tuple[int, int]) -> int:
    """Sum over tiles of the area of the tile (at ``scale``) grown by ``margin`` and clipped to ``size``."""
    def axis(bounds: tuple[int, ...], length: int) -> int:
        return sum(min(b1 * scale + margin, length) - max(b0 * scale - margin, 0)
                   for b0, b1 in zip(bounds[:-1], bounds[1:]))
    return axis(grid.rows, size[0]) * axis(grid.cols, size[1])


def _tile_bytes(grid: TileGrid, node: Node, margin: int, batch: int, itemsize: int) -> int:
    th = max(b - a for a, b in zip(grid.rows[:-1], grid.rows[1:])) * node.scale + 2 * margin
    tw = max(b - a for a, b in zip(grid.cols[:-1], grid.cols[1:])) * node.scale + 2 * margin
    return batch * node.channels * th * tw * itemsize


def step_grids(graph: Graph, steps: tuple[Step, ...], latent_hw: tuple[int, int], tile_latents: int) -> tuple:
    max_scale = max(n.scale for n in graph.nodes)
    return tuple(make_grid(latent_hw, pass_tile_latents(tile_latents, max_scale, pass_scale(graph, s)))
                 if isinstance(s, Pass) else None for s in steps)


def estimate(graph: Graph, steps: tuple[Step, ...], stored: frozenset[str], tile_latents: int,
             latent_hw: tuple[int, int], batch: int, itemsize: int,
             spilled: frozenset[str] = frozenset()) -> tuple[list[int], float]:
    """(estimated peak activation bytes of each step, total FLOPs) of running ``steps``; ``spilled`` nodes take
    no memory between passes, only the rectangles a tile reads back."""
    grids = step_grids(graph, steps, latent_hw, tile_latents)
    full = full_nodes(graph)
    last = last_reads(graph, steps)

    def nbytes(name: str) -> int:
        h, w = node_size(graph[name], latent_hw)
        return batch * graph[name].channels * h * w * itemsize

    produced: dict[str, int] = {graph.input: -1}
    for k, step in enumerate(steps):
        for name in (step.store if isinstance(step, Pass) else (step.node,)):
            produced[name] = k
    peaks, flops = [], 0.0
    for k, step in enumerate(steps):
        alive = [n for n, p in produced.items() if p < k and last.get(n, -1) >= k and n not in spilled]
        if isinstance(step, GlobalStep):
            src = graph[step.node].inputs[0]
            peaks.append(sum(map(nbytes, alive)) + nbytes(step.node) + int(_GLOBAL_TRANSIENT * nbytes(src)))
            continue
        grid = grids[k]
        static = sum(nbytes(n) for n in alive if n in full or last[n] > k)
        shrink = [n for n in alive if n not in full and last[n] == k]
        grow = [n for n in step.store if n not in full and n not in spilled]
        static += sum(nbytes(n) for n in step.store if n in full)
        # Inputs are freed chunk by chunk as outputs are written: at tile t of n, (n - t) / n of the inputs and
        # (t + 1) / n of the outputs are held, plus the chunks to the left that the next tile's halo reads.
        held, made = sum(map(nbytes, shrink)), sum(map(nbytes, grow))
        slack = (min(held, made) + (held if grid.count > 1 else 0)) / grid.count
        margins = _margins(graph, step, stored)
        work = 0
        for name in step.closure:
            node = graph[name]
            if name in stored and name not in step.store:
                continue
            size = node_size(node, latent_hw)
            flops += node.flops * batch * _tiled_area(grid, node.scale, margins.get(name, 0), size)
            src = _tile_bytes(grid, graph[node.inputs[0]], margins.get(node.inputs[0], 0), batch, itemsize)
            copy = {NORM_ACT_CONV: src, UP_CONV: 4 * src, DOWN_CONV: src, CONV: src}.get(node.op, 0)
            work = max(work, copy + _tile_bytes(grid, node, margins.get(name, 0), batch, itemsize))
        read_back = sum(_tile_bytes(grid, graph[n], margins.get(n, 0), batch, itemsize)
                        for n in step.reads if n in spilled)
        peaks.append(int(static + max(held, made) + slack + _TILE_TRANSIENT * work + read_back))
    return peaks, flops


def estimate_untiled(graph: Graph, latent_hw: tuple[int, int], batch: int, itemsize: int) -> tuple[int, float]:
    """(estimated peak activation bytes, FLOPs) of the plain, untiled forward pass (eager execution)."""
    def nbytes(node: Node) -> int:
        h, w = node_size(node, latent_hw)
        return batch * node.channels * h * w * itemsize

    last_use = {}
    for k, node in enumerate(graph.nodes):
        for src in node.inputs:
            last_use[src] = k
    live: dict[str, int] = {}
    peak, flops = 0, 0.0
    for k, node in enumerate(graph.nodes):
        out = nbytes(node)
        h, w = node_size(node, latent_hw)
        flops += node.flops * batch * h * w
        if node.op == INPUT:
            live[node.name] = out
            continue
        src = nbytes(graph[node.inputs[0]])
        if node.op == NORM_ACT_CONV:
            transient = max(2 * src, src + out)   # norm output + activation output, then activation + conv
        elif node.op == UP_CONV:
            transient = 4 * src + out             # the upsampled copy, then the convolution
        elif node.op == GLOBAL:
            transient = int(_GLOBAL_TRANSIENT * src)
        else:
            transient = out
        peak = max(peak, sum(live.values()) + transient)
        live[node.name] = out
        for s in node.inputs:
            if last_use[s] == k and s != graph.input:
                live.pop(s, None)
    return peak, flops


# ---------------------------------------------------------------------------------------------- planning
def _evaluate(graph, stored, spilled, tile_latents, latent_hw, batch, itemsize, limit):
    steps = schedule(graph, stored)
    peaks, flops = estimate(graph, steps, stored, tile_latents, latent_hw, batch, itemsize, spilled)
    excess = sum(max(0, p - limit) for p in peaks)
    return steps, peaks, flops, excess


def _involved(graph: Graph, steps: tuple[Step, ...], peaks: list[int], limit: float) -> set[str]:
    """Stored nodes held, written or read during the steps that are over ``limit``."""
    last = last_reads(graph, steps)
    produced = {}
    for k, step in enumerate(steps):
        for name in (step.store if isinstance(step, Pass) else (step.node,)):
            produced[name] = k
    over = [k for k, p in enumerate(peaks) if p > limit]
    return {n for n, p in produced.items() if any(p <= k <= last.get(n, p) for k in over)}


def choose_stored(graph: Graph, tile_latents: int, latent_hw: tuple[int, int], batch: int, itemsize: int,
                  memory_limit: float, spill: bool = False
                  ) -> tuple[frozenset[str], frozenset[str], tuple[Step, ...], int, float]:
    """Greedy: store every storable node; with ``spill``, spill the stored node that lowers the estimated excess
    over ``memory_limit`` most per byte spilled, until nothing is over (or nothing more helps); then recompute the
    node that lowers the excess most per extra FLOP, likewise. Returns (stored, spilled, steps, peak, FLOPs)."""
    full = full_nodes(graph)
    stored = frozenset(n.name for n in graph.nodes if n.storable) | full
    spilled: frozenset[str] = frozenset()
    args = (tile_latents, latent_hw, batch, itemsize, memory_limit)
    steps, peaks, flops, excess = _evaluate(graph, stored, spilled, *args)

    def nbytes(name: str) -> int:
        h, w = node_size(graph[name], latent_hw)
        return batch * graph[name].channels * h * w * itemsize

    def trials(recompute: bool):
        for name in sorted(_involved(graph, steps, peaks, memory_limit) - full - spilled, key=graph.index):
            if recompute:
                yield stored - {name}, spilled - {name}
            else:
                yield stored, spilled | {name}

    for recompute in ((False, True) if spill else (True,)):
        while excess > 0:
            best = None
            for t_stored, t_spilled in trials(recompute):
                t_steps, t_peaks, t_flops, t_excess = _evaluate(graph, t_stored, t_spilled, *args)
                gain = excess - t_excess
                if gain <= 0:
                    continue
                cost = t_flops - flops if recompute else nbytes(next(iter(t_spilled - spilled)))
                score = gain / max(cost, 1.0)
                if best is None or score > best[0]:
                    best = (score, t_stored, t_spilled, t_steps, t_peaks, t_flops, t_excess)
            if best is None:
                break
            _, stored, spilled, steps, peaks, flops, excess = best
    return stored, spilled, steps, max(peaks), flops


def run_steps(plan: "ExactPlan", stores: dict, run_global, run_pass) -> None:
    """Carry out ``plan.steps`` with a backend's ``run_global(step)`` and ``run_pass(k, step)``, dropping each
    stored node from ``stores`` after the last step that reads it."""
    for k, step in enumerate(plan.steps):
        if isinstance(step, GlobalStep):
            run_global(step)
        else:
            run_pass(k, step)
        for name in [n for n, last in plan.last_read.items() if last == k and n in stores]:
            del stores[name]


def graph_for(config: AutoencoderKLConfig, kind: str) -> Graph:
    return _graph(config, kind)


@functools.lru_cache(maxsize=16)
def _graph(config: AutoencoderKLConfig, kind: str) -> Graph:
    if kind == "decode":
        return decoder_graph(config)
    if kind == "encode":
        return encoder_graph(config)
    raise ValueError(f"kind must be 'decode' or 'encode', got {kind!r}")


# Plans may cost this much more arithmetic than the untiled computation, when that saves memory.
DEFAULT_MAX_FLOPS_RATIO = 1.1
# The limits tried, as fractions of the store-everything peak, looking for the leanest plan within that ratio.
_LIMIT_STEPS = (0.85, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25)


@functools.lru_cache(maxsize=64)
def plan_exact(config: AutoencoderKLConfig, kind: str, latent_hw: tuple[int, int], batch: int, itemsize: int,
               tile_latents: int, memory_limit: float | None = None,
               max_flops_ratio: float = DEFAULT_MAX_FLOPS_RATIO, spill: bool = False) -> ExactPlan:
    """The plan for decoding latents of ``latent_hw`` (or encoding images of ``latent_hw`` times the
    downsample factor) in tiles of at most ``tile_latents`` latent pixels.

    Among the plans whose estimated FLOPs stay within ``max_flops_ratio`` times the untiled computation's, the
    one with the lowest estimated peak memory is taken; if that peak is over ``memory_limit`` (bytes of
    activations), the fastest plan within ``memory_limit`` instead (trying smaller tiles too), or, when none
    fits, the leanest plan found. With ``spill``, plans over ``memory_limit`` spill stored nodes to files before
    they recompute any.
    """
    graph = _graph(config, kind)
    latent_hw = tuple(latent_hw)
    untiled_peak, untiled_flops = estimate_untiled(graph, latent_hw, batch, itemsize)
    args = (graph, latent_hw, batch, itemsize)
    # A plan is (tile, stored, spilled, steps, peak, flops).
    plans = [(tile_latents, *choose_stored(*args[:1], tile_latents, *args[1:], math.inf))]
    store_all_peak = plans[0][4]
    for fraction in _LIMIT_STEPS:
        plan = (tile_latents, *choose_stored(*args[:1], tile_latents, *args[1:], fraction * store_all_peak))
        if plan[5] > max_flops_ratio * untiled_flops:
            break
        plans.append(plan)
    best = plans[0]
    for plan in plans[1:]:  # recompute only for a saving of a quarter or more (estimates are good to ~10%)
        if plan[4] < 0.75 * best[4] and plan[5] <= max_flops_ratio * untiled_flops:
            best = plan
    if memory_limit is not None and best[4] > memory_limit:
        tile, best = tile_latents, None
        while True:
            plan = (tile, *choose_stored(*args[:1], tile, *args[1:], float(memory_limit), spill))
            if best is None or (plan[4] > memory_limit, plan[5] if plan[4] <= memory_limit else plan[4]) < \
                    (best[4] > memory_limit, best[5] if best[4] <= memory_limit else best[4]):
                best = plan
            if plan[4] <= memory_limit or tile <= 8:
                break
            tile //= 2
    tile, stored, spilled, steps, peak, flops = best
    return ExactPlan(graph, latent_hw, batch, itemsize, make_grid(latent_hw, tile),
                     step_grids(graph, steps, latent_hw, tile), stored, full_nodes(graph), steps,
                     last_reads(graph, steps), int(peak), flops, int(untiled_peak), untiled_flops, spilled)


def untiled_estimate(config: AutoencoderKLConfig, kind: str, latent_hw: tuple[int, int], batch: int,
                     itemsize: int) -> tuple[int, float]:
    """(peak activation bytes, FLOPs) estimated for an untiled decode or encode, library overhead included."""
    peak, flops = estimate_untiled(_graph(config, kind), tuple(latent_hw), batch, itemsize)
    return int(UNTILED_OVERHEAD * peak), flops


__all__ = ["ExactPlan", "GlobalStep", "Pass", "TileGrid", "estimate", "estimate_untiled", "graph_for",
           "make_grid", "plan_exact", "run_steps", "schedule", "split_evenly", "untiled_estimate", "ADD", "CONV"]
