"""Attention processors: each equals diffusers' output; chunked attention equals a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

from klvae import AttnProcessor, AttnProcessor2_0, ChunkedAttnProcessor

PROCESSORS = {
    "sdpa": AttnProcessor2_0,
    "math": AttnProcessor,
    "chunked_one_block": lambda: ChunkedAttnProcessor(query_chunk_size=7, key_chunk_size=4096),
    "chunked_many_blocks": lambda: ChunkedAttnProcessor(query_chunk_size=5, key_chunk_size=6),
}


def test_attn_processors_names_equal_diffusers():
    theirs, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    assert list(ours.attn_processors) == list(theirs.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in ours.attn_processors.values())


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_each_processor_equals_diffusers(name):
    theirs, ours = diffusers_pair(TINY_CONFIGS["three_blocks_l2"])
    ours.set_attn_processor(PROCESSORS[name]())
    x = torch.rand(2, 3, 28, 20) * 2 - 1  # 7x5 latent: 35 tokens
    with torch.no_grad():
        assert rel_err(ours(x).sample, theirs(x).sample) <= 1e-5


def test_set_attn_processor_by_dict_and_default():
    _, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    chunked = ChunkedAttnProcessor(8, 8)
    procs = {name: (chunked if name.startswith("encoder") else AttnProcessor()) for name in ours.attn_processors}
    ours.set_attn_processor(procs)
    assert ours.attn_processors == procs
    ours.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in ours.attn_processors.values())
    with pytest.raises(ValueError, match="expected exactly"):
        ours.set_attn_processor({"encoder.mid_block.attentions.0.processor": chunked})


def test_chunked_attention_against_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 16, generator=g) * 4 for _ in range(3))
    scale = 1 / math.sqrt(16)
    scores = (q.double() @ k.double().transpose(1, 2)) * scale
    expected = scores.softmax(-1) @ v.double()
    for proc in (ChunkedAttnProcessor(5, 6), ChunkedAttnProcessor(64, 64), AttnProcessor(), AttnProcessor2_0()):
        assert rel_err(proc(q, k, v, scale), expected) <= 2e-6, proc
    # bf16 inputs: float32 accumulation keeps the error at bf16 rounding level (against float64 on the same
    # rounded inputs), no worse than PyTorch's own bf16 SDPA.
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    expected_b = ((qb.double() @ kb.double().transpose(1, 2)) * scale).softmax(-1) @ vb.double()
    out = ChunkedAttnProcessor(5, 6)(qb, kb, vb, scale)
    sdpa_err = rel_err(AttnProcessor2_0()(qb, kb, vb, scale), expected_b)
    assert out.dtype == torch.bfloat16 and rel_err(out, expected_b) <= max(1e-2, 1.5 * sdpa_err)


def test_fused_projections_same_output_same_state_dict():
    theirs, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    x = torch.rand(2, 3, 10, 14) * 2 - 1
    keys = list(ours.state_dict())
    with torch.no_grad():
        before = ours(x).sample
        ours.fuse_qkv_projections()
        fused = ours(x).sample
        assert list(ours.state_dict()) == keys
        ours.unfuse_qkv_projections()
        after = ours(x).sample
    assert rel_err(fused, before) <= 1e-6 and torch.equal(after, before)
    with torch.no_grad():
        assert rel_err(fused, theirs(x).sample) <= 1e-5
