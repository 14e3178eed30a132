"""Run an :class:`~klvae.tiling_plan.ExactPlan` with PyTorch: the tensor operations of the shared executor.

The plan (backend-neutral) says which nodes each pass computes over which rectangles, and the executor skeleton
(:mod:`klvae.tiling_executor`) walks it: storage of kept nodes as per-tile chunks, freed during their last
reading pass, and the GroupNorm statistics accumulated per pass. This module supplies the tensors: each
operation over a rectangle (NCHW views, a reused zero-padded buffer for conv(act(norm(x))), in-place writes of
whole nodes) and the GroupNorm moments (:mod:`klvae.torch.groupnorm_stats`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from klvae.tiling_executor import ExactExecutor, Pads, Pieces, crop, zero_pads
from klvae.tiling_spill import SpillingExecutor
from klvae.tiling_graph import INPUT, Node, Region
from klvae.tiling_plan import ExactPlan
from klvae.torch.attention import Attention, AttnProcessor, ChunkedAttnProcessor
from klvae.torch.blocks import upsample_conv
from klvae.torch.groupnorm_stats import GroupNormStats, apply_norm

# The plain attention processor materialises (N, N) scores; above this many bytes of them, attend in chunks.
_MAX_ATTENTION_SCORES_BYTES = 1 << 30


def _conv(conv: nn.Conv2d, x: torch.Tensor, pads: Pads) -> torch.Tensor:
    """``conv`` without its own padding, on ``x`` zero-padded by ``pads`` (top, bottom, left, right)."""
    if any(pads):
        x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The activation, in place on ``x`` (a fresh tensor) where the function allows it."""
    if type(act) is nn.SiLU:
        return F.silu(x, inplace=True)
    if type(act) is nn.ReLU:
        return F.relu_(x)
    if type(act) is nn.Mish:
        return F.mish(x, inplace=True)
    return act(x)


class TorchTileOps:
    """The PyTorch operations of :class:`~klvae.tiling_executor.ExactExecutor`, on ``model``'s modules."""

    row_axis = 2  # NCHW
    in_place = True

    def __init__(self, model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device):
        self.model, self.batch, self.dtype, self.device = model, batch, dtype, device
        self.modules: dict[str, nn.Module] = {}
        self.buffers: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}

    def module(self, path: str) -> nn.Module:
        if path not in self.modules:
            self.modules[path] = self.model.get_submodule(path)
        return self.modules[path]

    # ------------------------------------------------------------------ arrays
    def join(self, parts: list[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(parts, dim=axis)

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, or a compact copy where it is a view into a larger tensor (which it would keep alive)."""
        if x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size():
            return x
        return x.clone(memory_format=torch.contiguous_format)

    def empty(self, node: Node, size: tuple[int, int]) -> torch.Tensor:
        return torch.empty(self.batch, node.channels, *size, dtype=self.dtype, device=self.device)

    def write(self, whole: torch.Tensor, region: Region, value: torch.Tensor) -> None:
        r0, r1, c0, c1 = region
        whole[:, :, r0:r1, c0:c1] = value

    def to_host(self, x: torch.Tensor) -> tuple[np.ndarray, torch.dtype]:
        """``x``'s bytes as a numpy array (bfloat16, which numpy lacks, as int16)."""
        x = x.detach().cpu()
        return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy(), x.dtype

    def from_host(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        x = torch.from_numpy(a)
        return (x.view(dtype) if x.dtype != dtype else x).to(self.device)

    def begin_pass(self) -> None:
        self.buffers.clear()  # scratch buffers live for one pass (their shapes change with the level)

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor, reused across tiles of the same shape: fresh large allocations are mapped from the
        OS page by page, which costs about as much as writing them once more."""
        buf = self.buffers.pop((torch.Size(shape), dtype), None)
        return buf if buf is not None else torch.empty(shape, dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ operations over a rectangle
    def conv(self, node: Node, x: torch.Tensor, wanted: Region, got: Region, stride: int) -> torch.Tensor:
        return _conv(self.module(node.conv), x, zero_pads(wanted, got))  # the module's own stride

    def up_conv(self, node: Node, x: torch.Tensor, got: Region, region: Region,
                in_size: tuple[int, int]) -> torch.Tensor:
        """The phase convolutions give whole input rows' output pairs: those of input rows lo (with a one-row
        border); an odd edge of ``region`` adds an output row that is computed from zeros and cropped."""
        conv = self.module(node.conv)
        r0, r1, c0, c1 = region
        lo = (r0 // 2, (r1 + 1) // 2, c0 // 2, (c1 + 1) // 2)
        pads = zero_pads((lo[0] - 1, lo[1] + 1, lo[2] - 1, lo[3] + 1), got)
        if any(pads):
            x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
        out = upsample_conv(x, conv.weight, conv.bias, padding=0)
        return crop(out, (2 * lo[0], 2 * lo[1], 2 * lo[2], 2 * lo[3]), region, self.row_axis)

    def norm_act_conv(self, node: Node, x: Pieces, wanted: Region, got: Region,
                      norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """conv(act(norm(x))) over ``wanted``: the normalised input is written straight into the convolution's
        zero-padded input buffer, piece by piece (no concatenation or padding copies)."""
        conv = self.module(node.conv)
        w0, w1, v0, v1 = wanted
        parts = x.crop(got)
        sample = parts[0][0]
        buf = self.buffer((sample.shape[0], sample.shape[1], w1 - w0, v1 - v0), sample.dtype)
        top, bottom, left, right = zero_pads(wanted, got)
        if top:
            buf[:, :, :top] = 0
        if bottom:
            buf[:, :, -bottom:] = 0
        if left:
            buf[:, :, :, :left] = 0
        if right:
            buf[:, :, :, -right:] = 0
        scale, shift = norm
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

    # ------------------------------------------------------------------ statistics and the global step
    def moments(self, groups: int) -> GroupNormStats:
        return GroupNormStats(groups)

    def scale_shift(self, node: Node, moments: GroupNormStats) -> tuple[torch.Tensor, torch.Tensor]:
        return moments.scale_shift(self.module(node.norm), self.dtype)

    def run_global(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return run_global_module(self.module(node.module), x)


def run_global_module(module: nn.Module, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Run a GLOBAL node's module on the whole tensor (an attention: only its output ``rows``, if given); the
    plain attention processor, which would hold the (N, N) scores, is swapped for the chunked one while a
    sequence is long."""
    args = () if rows is None else (rows,)
    if isinstance(module, Attention) and type(module.processor) is AttnProcessor:
        n = x.shape[2] * x.shape[3]
        queries = n if rows is None else (rows[1] - rows[0]) * x.shape[3]
        if x.shape[0] * queries * n * 4 > _MAX_ATTENTION_SCORES_BYTES:
            plain = module.processor
            module.set_processor(ChunkedAttnProcessor())
            try:
                return module(x, *args)
            finally:
                module.set_processor(plain)
    return module(x, *args)


def run_exact(model: nn.Module, plan: ExactPlan, x: torch.Tensor, spill_dir: str | None = None) -> torch.Tensor:
    """Decode latents or encode images (per ``plan.graph.kind``) with the plan; returns the output tensor.
    A plan that spills keeps its files in a temporary folder inside ``spill_dir`` (default: the system's)."""
    if plan.graph[plan.graph.input].op != INPUT:
        raise ValueError("the plan's graph has no input node")
    ops = TorchTileOps(model, plan.batch, x.dtype, x.device)
    with torch.no_grad():
        if plan.spilled:
            return SpillingExecutor(plan, ops, spill_dir).run(x)
        return ExactExecutor(plan, ops).run(x)
