"""The mid-block self-attention and its interchangeable attention processors.

A processor computes ``softmax(q k^T * scale) v`` for ``q, k, v`` of shape (B, N, C); the module around it does
the GroupNorm, projections and residual once, so every processor shares them. Processors:

- :class:`AttnProcessor2_0` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks a flash
  or memory-efficient kernel where one exists.
- :class:`AttnProcessor`: plain matrix products with the softmax in float32, as diffusers' classic processor.
- :class:`ChunkedAttnProcessor`: queries and keys in blocks with an online (running max) softmax, all in float32, so
  memory stays O(query_chunk * key_chunk) however long the sequence (262,144 tokens for a 4096x4096 image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from klvae.torch.norm import group_norm


class AttnProcessor2_0:
    """Scaled dot-product attention through PyTorch SDPA."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # SDPA wants (B, heads, N, C); the VAE has a single head.
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale)
        return out.squeeze(1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AttnProcessor(AttnProcessor2_0):
    """Attention as explicit matrix products, softmax computed in float32."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                               q, k.transpose(1, 2), beta=0, alpha=scale)
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        return torch.bmm(probs, v)


class ChunkedAttnProcessor(AttnProcessor2_0):
    """Blockwise attention with a running-max softmax in float32; memory bounded by the chunk sizes."""

    def __init__(self, query_chunk_size: int = 4096, key_chunk_size: int = 4096):
        if query_chunk_size < 1 or key_chunk_size < 1:
            raise ValueError("chunk sizes must be positive")
        self.query_chunk_size = query_chunk_size
        self.key_chunk_size = key_chunk_size

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = q.new_empty(q.shape[:2] + (v.shape[-1],), dtype=v.dtype)
        for start in range(0, q.shape[1], self.query_chunk_size):
            stop = start + self.query_chunk_size
            out[:, start:stop] = self._attend_block(q[:, start:stop], k, v, scale)
        return out

    def _attend_block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # Scores, softmax and accumulation all in float32: low-precision logits would be the largest error.
        q = q.float() * scale
        n_keys = k.shape[1]
        if n_keys <= self.key_chunk_size:  # one key block: an ordinary softmax
            return torch.bmm(torch.bmm(q, k.float().transpose(1, 2)).softmax(dim=-1), v.float()).to(v.dtype)
        running_max = torch.full(q.shape[:2] + (1,), -math.inf, device=q.device, dtype=torch.float32)
        denom = torch.zeros(q.shape[:2] + (1,), device=q.device, dtype=torch.float32)
        acc = torch.zeros(q.shape[:2] + (v.shape[-1],), device=q.device, dtype=torch.float32)
        for start in range(0, n_keys, self.key_chunk_size):
            kc = k[:, start:start + self.key_chunk_size].float()
            vc = v[:, start:start + self.key_chunk_size].float()
            scores = torch.bmm(q, kc.transpose(1, 2))
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            correction = torch.exp(running_max - new_max)
            probs = torch.exp(scores - new_max)
            denom = denom * correction + probs.sum(dim=-1, keepdim=True)
            acc = acc * correction + torch.bmm(probs, vc)
            running_max = new_max
        return (acc / denom).to(v.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(query_chunk_size={self.query_chunk_size}, key_chunk_size={self.key_chunk_size})"


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions of a (B, C, H, W) map, with a residual.

    Submodule names are diffusers' (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so the state_dict
    matches. ``fuse_projections()`` computes q, k and v with one matrix product (inference only: the fused copy
    does not follow later changes to the separate weights).
    """

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.channels = channels
        self.scale = 1.0 / math.sqrt(channels)
        self.group_norm = group_norm(channels, norm_num_groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.processor: AttnProcessor2_0 = AttnProcessor2_0()
        self.fused_projections = False

    def set_processor(self, processor: AttnProcessor2_0) -> None:
        if not callable(processor):
            raise TypeError(f"an attention processor must be callable, got {type(processor).__name__}")
        self.processor = processor

    def get_processor(self) -> AttnProcessor2_0:
        return self.processor

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate the q, k, v projections into one (kept as non-persistent buffers: not in state_dict)."""
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0)
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias], dim=0)
        self.register_buffer("qkv_weight", weight, persistent=False)
        self.register_buffer("qkv_bias", bias, persistent=False)
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        if self.fused_projections:
            del self.qkv_weight, self.qkv_bias
            self.fused_projections = False

    def forward(self, hidden_states: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Attention over all positions; with ``rows=(r0, r1)``, only the output rows r0:r1 (queries from those
        rows, keys and values from all; each query's softmax is its own, so the rows equal the whole's)."""
        b, c, h, w = hidden_states.shape
        residual = hidden_states if rows is None else hidden_states[:, :, rows[0]:rows[1]]
        x = self.group_norm(hidden_states.reshape(b, c, h * w)).transpose(1, 2)  # (b, hw, c)
        if rows is not None:
            xq = x[:, rows[0] * w:rows[1] * w]
            if self.fused_projections:
                q = F.linear(xq, self.qkv_weight[:c], self.qkv_bias[:c])
                k, v = F.linear(x, self.qkv_weight[c:], self.qkv_bias[c:]).chunk(2, dim=-1)
            else:
                q, k, v = self.to_q(xq), self.to_k(x), self.to_v(x)
            h = rows[1] - rows[0]
        elif self.fused_projections:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        x = self.processor(q, k, v, self.scale)
        x = self.to_out[1](self.to_out[0](x)).transpose(1, 2).reshape(b, c, h, w)
        # That reshape is a channels-last view; left so, the sum would be channels-last too and every layer after
        # it would run in that layout (on the CPU, with the channels-last GroupNorm kernel). Keep the input's.
        layout = torch.channels_last if residual.is_contiguous(memory_format=torch.channels_last) \
            and not residual.is_contiguous() else torch.contiguous_format
        return x.contiguous(memory_format=layout) + residual
