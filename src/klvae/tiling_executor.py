"""The executor skeleton of an :class:`~klvae.tiling_plan.ExactPlan`, shared by every backend (no torch, no jax).

:class:`ExactExecutor` holds what does not depend on the array library: the loop over the plan's steps and each
pass's tiles, the rectangles of every node, which stored chunks each tile reads and when they can shrink or go,
which tile values can be freed, the GroupNorm moments collected per pass and merged exactly
(:class:`GroupMoments`), and the per-tile chunk storage (:class:`ChunkStore`, :class:`WholeStore`,
:class:`Pieces`). A backend fills in the tensor operations with a :class:`TileOps` object: slicing and joining
arrays, a convolution over a zero-padded rectangle, conv(act(norm(x))), upsample+conv, the moments of a tile,
the GroupNorm scale and shift, and the global (attention) step.

Executors of other kinds reuse the skeleton by overriding its hooks: a distributed executor runs a share of the
tiles on each rank (:meth:`ExactExecutor.tiles`) and, after each pass, all-reduces the GroupNorm moments with
:meth:`GroupMoments.merge` and exchanges the stored chunks other ranks read (:meth:`ExactExecutor.end_pass`); a
traced JAX executor supplies operations that trace (moments kept as arrays on the device) and stores full nodes
as chunks (``TileOps.in_place = False``).

Regions are ``(r0, r1, c0, c1)`` in a node's own pixels (see :mod:`klvae.tiling_graph`).
"""

from __future__ import annotations

import bisect
from typing import Any, Protocol

from klvae.tiling import merge_moments
from klvae.tiling_graph import ADD, CONV, DOWN_CONV, NORM_ACT_CONV, UP_CONV, Node, Region, clip, input_region
from klvae.tiling_plan import ExactPlan, GlobalStep, Pass, TileGrid, run_steps

Array = Any  # a backend's array type
Pads = tuple[int, int, int, int]  # zero padding: top, bottom, left, right


def zero_pads(wanted: Region, got: Region) -> Pads:
    """Zero padding that extends the clipped rectangle ``got`` to the unclipped ``wanted``."""
    return got[0] - wanted[0], wanted[1] - got[1], got[2] - wanted[2], wanted[3] - got[3]


def relative(have: Region, want: Region) -> Region:
    """``want`` in the coordinates of an array holding ``have`` (which must contain it)."""
    if not (have[0] <= want[0] and want[1] <= have[1] and have[2] <= want[2] and want[3] <= have[3]):
        raise AssertionError(f"region {want} is not inside {have}")
    return want[0] - have[0], want[1] - have[0], want[2] - have[2], want[3] - have[2]


def crop(x: Array, have: Region, want: Region, row_axis: int) -> Array:
    """The part ``want`` of ``x``, which holds the rectangle ``have`` with rows on ``row_axis`` and columns on
    the next axis (a view where the array library has them)."""
    if have == want:
        return x
    r0, r1, c0, c1 = relative(have, want)
    index = [slice(None)] * x.ndim
    index[row_axis], index[row_axis + 1] = slice(r0, r1), slice(c0, c1)
    return x[tuple(index)]


class GroupMoments:
    """Per-(batch, group) count, mean and sum of squared deviations of a tensor seen one part at a time.

    Parts are combined with Chan et al.'s parallel formula (:func:`klvae.tiling.merge_moments`), so the result is
    that of the whole tensor. A backend's subclass supplies :meth:`part_moments` (and the GroupNorm it serves);
    :meth:`merge` combines the moments of disjoint parts collected elsewhere (another rank's tiles).
    """

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean: Any = None
        self.m2: Any = None

    def part_moments(self, x: Array) -> tuple[Any, Any]:
        """(mean, sum of squared deviations) of one part, each (B, groups)."""
        raise NotImplementedError

    def part_count(self, x: Array) -> int:
        """Elements per (batch, group) of one part."""
        raise NotImplementedError

    def update(self, x: Array) -> None:
        """Add a part holding pixels not seen before."""
        n = self.part_count(x)
        if n == 0:
            return
        self.add(n, *self.part_moments(x))

    def add(self, count: int, mean: Any, m2: Any) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, count, mean, m2)

    def merge(self, other: GroupMoments) -> None:
        if other.mean is not None:
            self.add(other.count, other.mean, other.m2)


class TileOps(Protocol):
    """The tensor operations a backend supplies to :class:`ExactExecutor`.

    Arrays hold rows on axis ``row_axis`` and columns on the next one (NCHW: 2, NHWC: 1). ``join`` concatenates
    arrays along an axis; ``own`` returns an array that holds no memory beyond its own elements (a chunk must
    not keep a whole tile alive); ``begin_pass`` is called before each pass's tiles (scratch buffers go);
    ``to_host``/``from_host`` move a chunk to a numpy array of its bytes and back (used only for plans that
    spill, :mod:`klvae.tiling_spill`).

    The node operations compute one node over ``region`` from its input, cut to the rectangle the node reads
    (``got``, clipped to the image; padding it with zeros to ``wanted`` is the operation's): ``conv`` (a CONV or
    DOWN_CONV node; ``stride`` 1 or 2), ``norm_act_conv`` (given the input's pieces and the GroupNorm's
    ``(scale, shift)`` from :meth:`scale_shift`), ``up_conv`` (``got`` in input pixels, ``region`` in output
    pixels). ``moments(groups)`` makes the GroupNorm accumulator a pass fills; ``run_global`` runs a GLOBAL node
    (the attention) on its whole input.
    """

    row_axis: int
    in_place: bool  # whether whole arrays can be written region by region (else full nodes are stored as chunks)

    def join(self, parts: list[Array], axis: int) -> Array: ...

    def own(self, x: Array) -> Array: ...

    def empty(self, node: Node, size: tuple[int, int]) -> Array:  # only with in_place: a whole node's array
        ...

    def write(self, whole: Array, region: Region, value: Array) -> None:  # only with in_place
        ...

    def begin_pass(self) -> None: ...

    def to_host(self, x: Array) -> tuple[Any, Any]:  # (numpy array of x's bytes, token for from_host)
        ...

    def from_host(self, a: Any, token: Any) -> Array: ...

    def conv(self, node: Node, x: Array, wanted: Region, got: Region, stride: int) -> Array: ...

    def norm_act_conv(self, node: Node, x: Pieces, wanted: Region, got: Region, norm: tuple[Any, Any]) -> Array: ...

    def up_conv(self, node: Node, x: Array, got: Region, region: Region, in_size: tuple[int, int]) -> Array: ...

    def moments(self, groups: int) -> GroupMoments: ...

    def scale_shift(self, node: Node, moments: GroupMoments) -> tuple[Any, Any]: ...

    def run_global(self, node: Node, x: Array) -> Array: ...


# ---------------------------------------------------------------------------------------------- storage
class Pieces:
    """A rectangle of a stored node as the views of the chunks it spans, ``[(array, region), ...]``, so that an
    operation can read them straight into its own buffer instead of joining them first."""

    def __init__(self, parts: list[tuple[Array, Region]], region: Region, ops: TileOps):
        self.parts, self.region, self.ops = parts, region, ops

    def crop(self, want: Region) -> list[tuple[Array, Region]]:
        out = []
        for array, have in self.parts:
            a = (max(have[0], want[0]), min(have[1], want[1]), max(have[2], want[2]), min(have[3], want[3]))
            if a[0] < a[1] and a[2] < a[3]:
                out.append((crop(array, have, a, self.ops.row_axis), a))
        return out

    def tensor(self, want: Region) -> Array:
        """The rectangle ``want`` as one array (joined from its chunks where it spans several)."""
        parts = self.crop(want)
        if len(parts) == 1:
            return parts[0][0]
        rows: dict[int, list[Array]] = {}
        for array, region in sorted(parts, key=lambda p: (p[1][0], p[1][2])):
            rows.setdefault(region[0], []).append(array)
        axis = self.ops.row_axis
        bands = [ts[0] if len(ts) == 1 else self.ops.join(ts, axis + 1) for _, ts in sorted(rows.items())]
        return bands[0] if len(bands) == 1 else self.ops.join(bands, axis)


def take(value: Array | Pieces, have: Region, want: Region, ops: TileOps) -> Array:
    """The rectangle ``want`` of a tile value (an array holding ``have``, or stored :class:`Pieces`)."""
    if isinstance(value, Pieces):
        return value.tensor(want)
    return crop(value, have, want, ops.row_axis)


class WholeStore:
    """A node held as one array (the input, the output, the attention's input and output)."""

    def __init__(self, array: Array, size: tuple[int, int], ops: TileOps):
        self.array, self.size, self.ops = array, size, ops

    def read(self, region: Region) -> Pieces:
        whole = (0, self.size[0], 0, self.size[1])
        return Pieces([(crop(self.array, whole, region, self.ops.row_axis), region)], region, self.ops)

    def write(self, key: tuple[int, int], region: Region, value: Array) -> None:
        self.ops.write(self.array, region, value)

    def whole(self) -> Array:
        return self.array


class ChunkStore:
    """A node held as one chunk per tile, each ``(array, first_row, end_row)``: all of the chunk's columns, and
    the rows ``first_row:end_row`` of it (all of them when written; chunks shrink to the rows later tiles still
    need, then go; a distributed rank holds only the rows its own tiles read)."""

    def __init__(self, rows: tuple[int, ...], cols: tuple[int, ...], ops: TileOps):
        self.rows, self.cols, self.ops = rows, cols, ops  # chunk boundaries in the node's pixels
        self.chunks: dict[tuple[int, int], tuple[Array, int, int]] = {}

    def chunk_range(self, region: Region) -> tuple[range, range]:
        r0, r1, c0, c1 = region
        return (range(bisect.bisect_right(self.rows, r0) - 1, bisect.bisect_left(self.rows, r1)),
                range(bisect.bisect_right(self.cols, c0) - 1, bisect.bisect_left(self.cols, c1)))

    def held(self, key: tuple[int, int]) -> Region:
        """The rectangle chunk ``key`` holds now."""
        _, first, end = self.chunks[key]
        return first, end, self.cols[key[1]], self.cols[key[1] + 1]

    def read(self, region: Region) -> Pieces:
        r0, r1, c0, c1 = region
        rows_i, cols_j = self.chunk_range(region)
        parts = []
        for i in rows_i:
            a, b = max(r0, self.rows[i]), min(r1, self.rows[i + 1])
            for j in cols_j:
                _, first, end = self.chunks[i, j]
                if a < first or b > end:
                    raise AssertionError(f"chunk {(i, j)} holds rows {first}:{end}; rows {a}:{b} are needed")
                want = (a, b, max(c0, self.cols[j]), min(c1, self.cols[j + 1]))
                parts.append((self.piece((i, j), want), want))
        return Pieces(parts, region, self.ops)

    def piece(self, key: tuple[int, int], want: Region) -> Array:
        """The rectangle ``want`` (inside what it holds) of chunk ``key``."""
        return crop(self.chunks[key][0], self.held(key), want, self.ops.row_axis)

    def write(self, key: tuple[int, int], region: Region, value: Array) -> None:
        self.put(key, (self.rows[key[0]], self.rows[key[0] + 1]), value)

    def put(self, key: tuple[int, int], rows: tuple[int, int], value: Array) -> None:
        """Hold ``value`` as rows ``rows`` (all columns) of chunk ``key``."""
        self.chunks[key] = (self.ops.own(value), *rows)

    def keep(self, key: tuple[int, int], rows: tuple[int, int] | None) -> None:
        """Cut chunk ``key`` down to ``rows`` (inside what it holds), or drop it (``rows=None``)."""
        if key not in self.chunks:
            return
        if rows is None:
            del self.chunks[key]
            return
        held = self.held(key)
        if rows != held[:2]:
            self.put(key, rows, crop(self.chunks[key][0], held, (*rows, *held[2:]), self.ops.row_axis))

    def release(self, key: tuple[int, int], keep_from: int | None) -> None:
        """Drop chunk ``key`` (``keep_from=None``) or all of it above row ``keep_from``."""
        if key not in self.chunks:
            return
        if keep_from is None:
            del self.chunks[key]
            return
        _, first, end = self.chunks[key]
        if keep_from > first:
            self.keep(key, (keep_from, end))

    def whole(self) -> Array:
        last = (self.rows[0], self.rows[-1], self.cols[0], self.cols[-1])
        return self.read(last).tensor(last)


Store = WholeStore | ChunkStore


def releases(stores: dict[str, Store], names: list[str], regions: list[dict[str, Region]]) -> dict[int, list]:
    """For the chunked nodes read for the last time in a pass: after which tile each chunk can shrink or go.

    Returns ``{tile_index: [(name, chunk, keep_from_row_or_None), ...]}``.
    """
    out: dict[int, list] = {}
    for name in names:
        store = stores[name]
        if not isinstance(store, ChunkStore):
            continue
        touches: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for t, need in enumerate(regions):
            region = need.get(name)
            if region is None:
                continue
            rows_i, cols_j = store.chunk_range(region)
            for i in rows_i:
                for j in cols_j:
                    touches.setdefault((i, j), []).append((t, max(region[0], store.rows[i])))
        for key in store.chunks:
            uses = touches.get(key, [])
            for k, (t, _) in enumerate(uses):
                later = [row for _, row in uses[k + 1:]]
                keep = min(later) if later else None
                half = (store.rows[key[0]] + store.rows[key[0] + 1]) // 2
                if keep is None or keep > half:  # shrink only when that frees at least half the chunk
                    out.setdefault(t, []).append((name, key, keep))
    return out


def groups_reading(graph, name: str) -> int:
    """The GroupNorm groups of the norms that read node ``name`` (they must agree)."""
    groups = {n.groups for n in graph.nodes if n.op == NORM_ACT_CONV and n.inputs[0] == name}
    if len(groups) != 1:
        raise ValueError(f"the GroupNorms reading {name} disagree on the number of groups: {sorted(groups)}")
    return groups.pop()


# ---------------------------------------------------------------------------------------------- the executor
class ExactExecutor:
    """Runs ``plan`` with ``ops``: ``ExactExecutor(plan, ops).run(x)`` returns the plan's output array."""

    def __init__(self, plan: ExactPlan, ops: TileOps):
        self.plan, self.graph, self.ops = plan, plan.graph, ops
        self.stores: dict[str, Store] = {}
        self.stats: dict[str, GroupMoments] = {}
        self.norms: dict[str, tuple[Any, Any]] = {}

    # ------------------------------------------------------------------ hooks for other kinds of executor
    # (tiles and end_pass: a distributed executor; spilled_store: klvae.tiling_spill.SpillingExecutor)
    def tiles(self, k: int, step: Pass, grid: TileGrid) -> list[tuple[int, int]]:
        """The tiles of pass ``k`` this executor computes (all of them; a rank of a distributed run: its share)."""
        return grid.tiles()

    def end_pass(self, k: int, step: Pass) -> None:
        """Called after the tiles of pass ``k`` (a distributed run merges moments and exchanges chunks here)."""

    # ------------------------------------------------------------------ steps
    def run(self, x: Array) -> Array:
        graph = self.graph
        self.stores[graph.input] = WholeStore(x, self.plan.size(graph.input), self.ops)
        run_steps(self.plan, self.stores, self.run_global, self.run_pass)
        return self.stores[graph.output].whole()

    def new_store(self, name: str, grid: TileGrid) -> Store:
        node = self.graph[name]
        if name in self.plan.full and self.ops.in_place:
            size = self.plan.size(name)
            return WholeStore(self.ops.empty(node, size), size, self.ops)
        rows, cols = tuple(r * node.scale for r in grid.rows), tuple(c * node.scale for c in grid.cols)
        if name in self.plan.spilled:
            return self.spilled_store(name, rows, cols)
        return ChunkStore(rows, cols, self.ops)

    def spilled_store(self, name: str, rows: tuple[int, ...], cols: tuple[int, ...]) -> ChunkStore:
        """The store of a node the plan spills to files (:class:`klvae.tiling_spill.SpillingExecutor`)."""
        raise NotImplementedError(f"the plan spills {name} to a file: run it with klvae.tiling_spill."
                                  "SpillingExecutor")

    def run_global(self, step: GlobalStep) -> None:
        node = self.graph[step.node]
        out = self.ops.run_global(node, self.stores[node.inputs[0]].whole())
        self.stores[node.name] = WholeStore(out, self.plan.size(node.name), self.ops)

    def run_pass(self, k: int, step: Pass) -> None:
        plan, graph = self.plan, self.graph
        grid = plan.grids[k]
        tiles = self.tiles(k, step, grid)
        regions = [plan.regions(step, i, j, grid) for i, j in tiles]
        for name in step.store:
            self.stores[name] = self.new_store(name, grid)
        for name in step.stats:
            self.stats[name] = self.ops.moments(groups_reading(graph, name))
        last_here = [n for n in step.reads if plan.last_read.get(n) == k]
        released = releases(self.stores, last_here, regions)
        last_use = self.last_uses(step)
        self.ops.begin_pass()
        for t, (i, j) in enumerate(tiles):
            self.run_tile(step, grid, i, j, regions[t], last_use)
            for name, key, keep in released.get(t, ()):
                self.stores[name].release(key, keep)
        self.end_pass(k, step)

    def last_uses(self, step: Pass) -> dict[str, int]:
        """Index in the closure of each node's last consumer, so tile values are freed as soon as possible."""
        order = {name: idx for idx, name in enumerate(step.closure)}
        last_use = dict(order)
        for name in step.closure:
            if name in self.plan.stored and name not in step.store:
                continue
            for src in self.graph[name].inputs:
                if src in order:
                    last_use[src] = max(last_use[src], order[name])
        return last_use

    def run_tile(self, step: Pass, grid: TileGrid, i: int, j: int, need: dict[str, Region],
                 last_use: dict[str, int]) -> None:
        plan, graph = self.plan, self.graph
        values: dict[str, tuple[Array | Pieces, Region]] = {}
        for idx, name in enumerate(step.closure):
            region = need[name]
            if name in plan.stored and name not in step.store:
                value = self.stores[name].read(region)
            else:
                node = graph[name]
                value = self.compute(node, region, values)
                for src in node.inputs:
                    if last_use.get(src) == idx:
                        values.pop(src, None)
            values[name] = (value, region)
            if name in step.store or name in step.stats:
                owned = grid.owned(i, j, graph[name].scale)
                part = take(value, region, owned, self.ops)
                if name in step.store:
                    self.stores[name].write((i, j), owned, part)
                if name in step.stats:
                    self.stats[name].update(part)
            if last_use[name] == idx and name not in step.targets:
                values.pop(name, None)

    # ------------------------------------------------------------------ one node over one rectangle
    def compute(self, node: Node, region: Region, values: dict[str, tuple[Array | Pieces, Region]]) -> Array:
        ops = self.ops
        x, have = values[node.inputs[0]]
        in_size = self.plan.size(node.inputs[0])
        if node.op == ADD:
            y, y_have = values[node.inputs[1]]
            return take(x, have, region, ops) + take(y, y_have, region, ops)
        if node.op == UP_CONV:
            got = input_region(node, region, in_size)
            return ops.up_conv(node, take(x, have, got, ops), got, region, in_size)
        r0, r1, c0, c1 = region
        if node.op == DOWN_CONV:
            wanted, stride = (2 * r0, 2 * r1 + 1, 2 * c0, 2 * c1 + 1), 2
        elif node.op in (CONV, NORM_ACT_CONV):
            p = node.kernel // 2
            wanted, stride = (r0 - p, r1 + p, c0 - p, c1 + p), 1
        else:
            raise ValueError(f"cannot compute a {node.op} node over a tile")
        got = clip(wanted, in_size)
        if node.op == NORM_ACT_CONV:
            pieces = x if isinstance(x, Pieces) else Pieces([(x, have)], have, ops)
            return ops.norm_act_conv(node, pieces, wanted, got, self.norm(node))
        return ops.conv(node, take(x, have, got, ops), wanted, got, stride)

    def norm(self, node: Node) -> tuple[Any, Any]:
        """(scale, shift) of ``node``'s GroupNorm over the whole input, from the moments of an earlier pass."""
        if node.name not in self.norms:
            self.norms[node.name] = self.ops.scale_shift(node, self.stats[node.inputs[0]])
        return self.norms[node.name]


__all__ = ["ChunkStore", "ExactExecutor", "GroupMoments", "Pieces", "TileOps", "WholeStore", "crop",
           "groups_reading", "relative", "releases", "take", "zero_pads"]
