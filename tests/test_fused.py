"""GroupNorm + activation (klvae.torch.fused) against float64 GroupNorm, in float32 and bfloat16, contiguous and
channels_last, with large group means; its traced form, its compiled kernel (CPU inductor) and the fallback;
and the cached phase kernels of the upsampler following their weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import klvae.torch.blocks as blocks
import klvae.torch.fused as fused
from klvae.torch.norm import GroupNorm

ACTS = {"silu": nn.SiLU(), "mish": nn.Mish(), "relu": nn.ReLU(), "gelu": nn.GELU(), "none": None}


def _case(mean: float, dtype: torch.dtype, layout: torch.memory_format, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Batch 2, odd sizes, a spread of channel offsets inside each group, a large common mean.
    x = torch.randn(2, 12, 7, 9, generator=g) * 2 + mean + torch.arange(12).view(1, 12, 1, 1) % 3
    norm = GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    x = x.to(dtype)
    return x.contiguous(memory_format=layout), norm.to(dtype)


def _expected(x, norm, act):
    y = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    return act.double()(y) if act is not None else y


# float32 tolerances: the traced form and the centred channels-last path are precise however large the mean; the
# stock contiguous kernel applies x * scale + shift in one step, which loses |mean| / std float32 ulps.
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("mean", [0.0, 1000.0])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_group_norm_act_against_float64(dtype, layout, mean, act):
    x, norm = _case(mean, dtype, layout)
    act = ACTS[act]
    expected = _expected(x, norm, act)
    with torch.no_grad():
        eager = fused.group_norm_act(x, norm, act)
        traced = fused.group_norm_expr(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                       fused._ACTS.get(type(act)))
        if act is not None and type(act) not in fused._ACTS:
            traced = act(traced)
    for got in (eager, traced):
        assert got.dtype == dtype and got.is_contiguous(memory_format=layout)
    if dtype == torch.bfloat16:
        assert rel_err(eager, expected) <= 1e-2 and rel_err(traced, expected) <= 1e-2
        return
    assert rel_err(traced, expected) <= 1e-6
    stock_apply = layout == torch.contiguous_format and mean
    assert rel_err(eager, expected) <= (1e-4 if stock_apply else 1e-6)
    if mean and layout == torch.channels_last:   # what the channels-last path guards against
        assert rel_err(F.group_norm(x, 4, norm.weight, norm.bias, 1e-6), _expected(x, norm, None)) > 1e-2


def test_input_is_not_modified_and_autograd_matches_float64():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) + 3.0).requires_grad_()
    norm = GroupNorm(2, 4, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    before = x.detach().clone()
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        assert torch.autograd.gradcheck(lambda v: fused.group_norm_act(v, norm, nn.SiLU()), (xl,))
        assert torch.autograd.gradcheck(lambda v: fused.group_norm_expr(v, 2, norm.weight, norm.bias, 1e-6, "silu"),
                                        (xl,))
    assert torch.equal(x.detach(), before)


def test_compiled_kernel_on_cpu_inductor(monkeypatch):
    """The kernel CUDA uses by default, compiled here by CPU inductor: equal to float64 (channels_last, large
    means: the case the stock CPU kernel gets wrong)."""
    import torch._dynamo

    monkeypatch.setenv("KLVAE_FUSED_KERNEL", "1")
    torch._dynamo.reset()
    with torch.no_grad():
        for layout in (torch.channels_last,):
            x, norm = _case(1000.0, torch.float32, layout, seed=1)
            got = fused.group_norm_act(x, norm, nn.SiLU())
            assert "cpu" not in fused._broken
            assert got.is_contiguous(memory_format=layout)
            assert rel_err(got, _expected(x, norm, nn.SiLU())) <= 1e-6


def test_compiled_kernel_failure_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("KLVAE_FUSED_KERNEL", "1")
    monkeypatch.setattr(fused, "_compiled", lambda: broken)
    monkeypatch.setattr(fused, "_broken", set())
    x, norm = _case(0.0, torch.float32, torch.contiguous_format)
    with pytest.warns(RuntimeWarning, match="no compiler here"), torch.no_grad():
        got = fused.group_norm_act(x, norm, nn.SiLU())
    assert rel_err(got, _expected(x, norm, nn.SiLU())) <= 1e-6
    assert not fused.wanted(x.device)          # one warning, then eager from now on
    monkeypatch.setenv("KLVAE_FUSED_KERNEL", "0")
    assert not fused.wanted(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------- phase kernels
def test_cached_phase_kernels_follow_their_weights():
    up = blocks.Upsample2D(3)
    x = torch.randn(1, 3, 4, 5)

    def expected():
        w, b = up.conv.weight.double(), up.conv.bias.double()
        return F.conv2d(F.interpolate(x.double(), scale_factor=2.0), w, b, padding=1)

    with torch.no_grad():
        first = up(x)
        assert rel_err(first, expected()) <= 1e-6
        assert blocks._cached_phase_kernels(up.conv.weight) is blocks._cached_phase_kernels(up.conv.weight)
        up.conv.weight.mul_(2)                                   # in place: a new version
        assert rel_err(up(x), expected()) <= 1e-6
        up.load_state_dict({"conv.weight": torch.randn(3, 3, 3, 3), "conv.bias": torch.randn(3)})
        assert rel_err(up(x), expected()) <= 1e-6
        up.double()                                              # new storage and dtype, same Parameter
        assert up(x.double()).dtype == torch.float64 and rel_err(up(x.double()), expected()) <= 1e-12
    up.float()
    out = up(x)                                                  # with autograd: built in the graph
    out.sum().backward()
    assert up.conv.weight.grad is not None
