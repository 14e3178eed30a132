"""Run an :class:`~klvae.tiling_plan.ExactPlan` with PyTorch: tiles, stored chunks, GroupNorm statistics.

The plan (backend-neutral) says which nodes each pass computes over which rectangles; this module supplies
the tensors: each operation over a rectangle, storage of kept nodes as per-tile chunks (freed during their last
reading pass, down to the rows a later tile still needs), and the GroupNorm statistics accumulated per pass.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

from klvae.tiling_graph import (ADD, CONV, DOWN_CONV, INPUT, NORM_ACT_CONV, UP_CONV, Node, Region, clip,
                                input_region)
from klvae.tiling_plan import ExactPlan, GlobalStep, Pass, run_steps
from klvae.torch.attention import Attention, AttnProcessor, ChunkedAttnProcessor
from klvae.torch.blocks import upsample_conv
from klvae.torch.groupnorm_stats import GroupNormStats, apply_norm

# The plain attention processor materialises (N, N) scores; above this many bytes of them, attend in chunks.
_MAX_ATTENTION_SCORES_BYTES = 1 << 30


def crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    """The part ``want`` of ``x``, which holds the rectangle ``have`` (a view)."""
    if have == want:
        return x
    if not (have[0] <= want[0] and want[1] <= have[1] and have[2] <= want[2] and want[3] <= have[3]):
        raise AssertionError(f"region {want} is not inside {have}")
    return x[:, :, want[0] - have[0]:want[1] - have[0], want[2] - have[2]:want[3] - have[2]]


# ---------------------------------------------------------------------------------------------- storage
class Pieces:
    """A rectangle of a stored node as the views of the chunks it spans, ``[(tensor, region), ...]``, so that a
    normalisation can read them straight into its padded buffer instead of concatenating them first."""

    def __init__(self, parts: list[tuple[torch.Tensor, Region]], region: Region):
        self.parts, self.region = parts, region

    def crop(self, want: Region) -> list[tuple[torch.Tensor, Region]]:
        out = []
        for tensor, (r0, r1, c0, c1) in self.parts:
            a = (max(r0, want[0]), min(r1, want[1]), max(c0, want[2]), min(c1, want[3]))
            if a[0] < a[1] and a[2] < a[3]:
                out.append((crop(tensor, (r0, r1, c0, c1), a), a))
        return out

    def tensor(self, want: Region) -> torch.Tensor:
        parts = self.crop(want)
        if len(parts) == 1:
            return parts[0][0]
        rows: dict[int, list[torch.Tensor]] = {}
        for tensor, region in sorted(parts, key=lambda p: (p[1][0], p[1][2])):
            rows.setdefault(region[0], []).append(tensor)
        bands = [ts[0] if len(ts) == 1 else torch.cat(ts, dim=3) for _, ts in sorted(rows.items())]
        return bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)


def _take(value: torch.Tensor | Pieces, have: Region, want: Region) -> torch.Tensor:
    return value.tensor(want) if isinstance(value, Pieces) else crop(value, have, want)


class FullStore:
    """A node held as one tensor (the input, the output, the attention's input and output)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def read(self, region: Region) -> Pieces:
        r0, r1, c0, c1 = region
        return Pieces([(self.tensor[:, :, r0:r1, c0:c1], region)], region)

    def write(self, region: Region, value: torch.Tensor) -> None:
        r0, r1, c0, c1 = region
        self.tensor[:, :, r0:r1, c0:c1] = value

    def release(self, key, keep_from: int | None) -> None:  # whole tensors are dropped after their last pass
        pass


class ChunkStore:
    """A node held as one chunk per tile, each chunk ``(tensor, first_row)``; chunks shrink to the rows later
    tiles still need, then go."""

    def __init__(self, rows: tuple[int, ...], cols: tuple[int, ...]):
        self.rows, self.cols = rows, cols  # chunk boundaries in the node's pixels
        self.chunks: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}

    def chunk_range(self, region: Region) -> tuple[range, range]:
        r0, r1, c0, c1 = region
        return (range(bisect.bisect_right(self.rows, r0) - 1, bisect.bisect_left(self.rows, r1)),
                range(bisect.bisect_right(self.cols, c0) - 1, bisect.bisect_left(self.cols, c1)))

    def read(self, region: Region) -> Pieces:
        r0, r1, c0, c1 = region
        rows_i, cols_j = self.chunk_range(region)
        parts = []
        for i in rows_i:
            a, b = max(r0, self.rows[i]), min(r1, self.rows[i + 1])
            for j in cols_j:
                tensor, first = self.chunks[i, j]
                if a < first:
                    raise AssertionError(f"chunk {(i, j)} was released above row {first}; row {a} is needed")
                c, d = max(c0, self.cols[j]), min(c1, self.cols[j + 1])
                parts.append((tensor[:, :, a - first:b - first, c - self.cols[j]:d - self.cols[j]], (a, b, c, d)))
        return Pieces(parts, region)

    def write(self, key: tuple[int, int], value: torch.Tensor) -> None:
        self.chunks[key] = (value.contiguous(), self.rows[key[0]])

    def release(self, key: tuple[int, int], keep_from: int | None) -> None:
        """Drop chunk ``key`` (``keep_from=None``) or all of it above row ``keep_from``."""
        if key not in self.chunks:
            return
        if keep_from is None:
            del self.chunks[key]
            return
        tensor, first = self.chunks[key]
        if keep_from > first:
            self.chunks[key] = (tensor[:, :, keep_from - first:].clone(), keep_from)


def _releases(plan: ExactPlan, stores: dict, names: list[str], regions: list[dict[str, Region]]):
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


# ---------------------------------------------------------------------------------------------- operations
def _conv(conv: nn.Conv2d, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """``conv`` without its own padding, on ``x`` zero-padded by ``pads`` (left, right, top, bottom)."""
    if any(pads):
        x = F.pad(x, pads)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _pads(wanted: Region, got: Region) -> tuple[int, int, int, int]:
    """Zero padding that extends the clipped rectangle ``got`` to the unclipped ``wanted``."""
    return got[2] - wanted[2], wanted[3] - got[3], got[0] - wanted[0], wanted[1] - got[1]


def _activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The activation, in place on ``x`` (a fresh tensor) where the function allows it."""
    if type(act) is nn.SiLU:
        return F.silu(x, inplace=True)
    if type(act) is nn.ReLU:
        return F.relu_(x)
    if type(act) is nn.Mish:
        return F.mish(x, inplace=True)
    return act(x)


class _Executor:
    def __init__(self, model: nn.Module, plan: ExactPlan):
        self.model, self.plan, self.graph = model, plan, plan.graph
        self.stores: dict[str, FullStore | ChunkStore] = {}
        self.stats: dict[str, GroupNormStats] = {}
        self.norm_params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.modules: dict[str, nn.Module] = {}
        self.buffers: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}

    def module(self, path: str) -> nn.Module:
        if path not in self.modules:
            self.modules[path] = self.model.get_submodule(path)
        return self.modules[path]

    # ------------------------------------------------------------------ one node over one rectangle
    def compute(self, node: Node, region: Region, values: dict[str, tuple[torch.Tensor, Region]]) -> torch.Tensor:
        src_name = node.inputs[0]
        x, have = values[src_name]
        src_size = self.plan.size(src_name)
        if node.op == ADD:
            y, y_have = values[node.inputs[1]]
            return _take(x, have, region) + _take(y, y_have, region)
        conv = self.module(node.conv)
        if node.op == NORM_ACT_CONV:
            return self.norm_act_conv(node, conv, x, have, region, src_size)
        if node.op == UP_CONV:
            # The phase convolutions give whole input rows' output pairs: those of input rows lo (with a
            # one-row border); an odd edge of ``region`` adds an output row that is computed from zeros and cropped.
            r0, r1, c0, c1 = region
            lo = (r0 // 2, (r1 + 1) // 2, c0 // 2, (c1 + 1) // 2)
            wanted = (lo[0] - 1, lo[1] + 1, lo[2] - 1, lo[3] + 1)
            got = input_region(node, region, src_size)
            src = _take(x, have, got)
            if any(_pads(wanted, got)):
                src = F.pad(src, _pads(wanted, got))
            out = upsample_conv(src, conv.weight, conv.bias, padding=0)
            return crop(out, (2 * lo[0], 2 * lo[1], 2 * lo[2], 2 * lo[3]), region)
        if node.op == DOWN_CONV:
            r0, r1, c0, c1 = region
            wanted = (2 * r0, 2 * r1 + 1, 2 * c0, 2 * c1 + 1)
            got = clip(wanted, src_size)
            return _conv(conv, _take(x, have, got), _pads(wanted, got))
        if node.op != CONV:
            raise ValueError(f"cannot compute a {node.op} node over a tile")
        p = node.kernel // 2
        wanted = (region[0] - p, region[1] + p, region[2] - p, region[3] + p)
        got = clip(wanted, src_size)
        return _conv(conv, _take(x, have, got), _pads(wanted, got))

    def norm_act_conv(self, node: Node, conv: nn.Conv2d, x, have: Region, region: Region,
                      src_size: tuple[int, int]) -> torch.Tensor:
        """conv(act(norm(x))) over ``region``: the normalised input is written straight into the convolution's
        zero-padded input buffer, piece by piece (no concatenation or padding copies)."""
        p = node.kernel // 2
        w0, w1, v0, v1 = (region[0] - p, region[1] + p, region[2] - p, region[3] + p)
        got = clip((w0, w1, v0, v1), src_size)
        parts = x.crop(got) if isinstance(x, Pieces) else [(crop(x, have, got), got)]
        sample = parts[0][0]
        buf = self.buffer((sample.shape[0], sample.shape[1], w1 - w0, v1 - v0), sample.dtype)
        top, bottom, left, right = got[0] - w0, w1 - got[1], got[2] - v0, v1 - got[3]
        if top:
            buf[:, :, :top] = 0
        if bottom:
            buf[:, :, -bottom:] = 0
        if left:
            buf[:, :, :, :left] = 0
        if right:
            buf[:, :, :, -right:] = 0
        scale, shift = self.norm(node)
        for tensor, (a, b, c, d) in parts:
            dst = buf[:, :, a - w0:b - w0, c - v0:d - v0]
            if tensor.dtype == scale.dtype:
                torch.addcmul(shift, tensor, scale, out=dst)
            else:
                dst.copy_(apply_norm(tensor, scale, shift))
        inner = buf[:, :, top:buf.shape[2] - bottom, left:buf.shape[3] - right]
        activated = _activate(self.module(node.act), inner)
        if activated is not inner:  # an activation without an in-place form
            inner.copy_(activated)
        out = F.conv2d(buf, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        self.buffers[buf.shape, buf.dtype] = buf
        return out

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor, reused across tiles of the same shape: fresh large allocations are mapped from the
        OS page by page, which costs about as much as writing them once more."""
        buf = self.buffers.pop((torch.Size(shape), dtype), None)
        return buf if buf is not None else torch.empty(shape, dtype=dtype, device=self.device)

    def norm(self, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
        if node.name not in self.norm_params:
            stats = self.stats[node.inputs[0]]
            self.norm_params[node.name] = stats.scale_shift(self.module(node.norm), self.dtype)
        return self.norm_params[node.name]

    # ------------------------------------------------------------------ steps
    def run(self, x: torch.Tensor) -> torch.Tensor:
        plan, graph = self.plan, self.graph
        self.dtype, self.device = x.dtype, x.device
        self.stores[graph.input] = FullStore(x)
        run_steps(plan, self.stores, self.run_global, self.run_pass)
        return self.stores[graph.output].tensor

    def new_store(self, name: str, grid) -> FullStore | ChunkStore:
        node = self.graph[name]
        if name in self.plan.full:
            h, w = self.plan.size(name)
            return FullStore(torch.empty(self.plan.batch, node.channels, h, w, dtype=self.dtype, device=self.device))
        return ChunkStore(tuple(r * node.scale for r in grid.rows), tuple(c * node.scale for c in grid.cols))

    def run_global(self, step: GlobalStep) -> None:
        node = self.graph[step.node]
        x = self.stores[node.inputs[0]].tensor
        module = self.module(node.module)
        self.stores[node.name] = FullStore(_run_whole(module, x))

    def run_pass(self, k: int, step: Pass) -> None:
        plan, graph = self.plan, self.graph
        grid = plan.grids[k]
        tiles = grid.tiles()
        regions = [plan.regions(step, i, j, grid) for i, j in tiles]
        for name in step.store:
            self.stores[name] = self.new_store(name, grid)
        for name in step.stats:
            self.stats[name] = GroupNormStats(_groups_reading(graph, name))
        last_here = [n for n in step.reads if plan.last_read.get(n) == k]
        releases = _releases(plan, self.stores, last_here, regions)
        # Index in the closure of each node's last consumer, so tile values are freed as soon as possible.
        order = {name: idx for idx, name in enumerate(step.closure)}
        last_use = {name: idx for idx, name in enumerate(step.closure)}
        for name in step.closure:
            if name in plan.stored and name not in step.store:
                continue
            for src in graph[name].inputs:
                if src in order:
                    last_use[src] = max(last_use[src], order[name])
        self.buffers.clear()  # scratch buffers live for one pass (their shapes change with the level)
        for t, (i, j) in enumerate(tiles):
            need = regions[t]
            values: dict[str, tuple[torch.Tensor, Region]] = {}
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
                    part = _take(value, region, owned)
                    if name in step.store:
                        store = self.stores[name]
                        store.write(owned if isinstance(store, FullStore) else (i, j), part)
                    if name in step.stats:
                        self.stats[name].update(part)
                if last_use[name] == idx and name not in step.targets:
                    values.pop(name, None)
            del values
            for name, key, keep in releases.get(t, ()):
                self.stores[name].release(key, keep)


def _groups_reading(graph, name: str) -> int:
    groups = {n.groups for n in graph.nodes if n.op == NORM_ACT_CONV and n.inputs[0] == name}
    if len(groups) != 1:
        raise ValueError(f"the GroupNorms reading {name} disagree on the number of groups: {sorted(groups)}")
    return groups.pop()


def _run_whole(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a GLOBAL node's module on the whole tensor; the plain attention processor, which would hold the
    (N, N) scores, is swapped for the chunked one while a sequence is long."""
    if isinstance(module, Attention) and type(module.processor) is AttnProcessor:
        n = x.shape[2] * x.shape[3]
        if x.shape[0] * n * n * 4 > _MAX_ATTENTION_SCORES_BYTES:
            plain = module.processor
            module.set_processor(ChunkedAttnProcessor())
            try:
                return module(x)
            finally:
                module.set_processor(plain)
    return module(x)


def run_exact(model: nn.Module, plan: ExactPlan, x: torch.Tensor) -> torch.Tensor:
    """Decode latents or encode images (per ``plan.graph.kind``) with the plan; returns the output tensor."""
    if plan.graph[plan.graph.input].op != INPUT:
        raise ValueError("the plan's graph has no input node")
    with torch.no_grad():
        return _Executor(model, plan).run(x)
