"""Which dtype and layout the model computes in, and the float16 overflow fallback.

A model cast with ``vae.to(torch.bfloat16)`` keeps its weights in bfloat16, but on a CPU without native bf16
(oneDNN needs AVX512-BF16, AVX512 or AMX for it) torch runs bf16 convolutions and matrix products on a scalar
reference path: measured here on an AVX2 CPU, a bf16 GEMM ran at 0.3 GFLOP/s against 167 GFLOP/s in float32, and
one 256x256 SD decode took minutes instead of 4 s. The same holds for float16. There the model computes in
float32 with the weights upcast for the call (the result is returned in the model's dtype), which is both faster
and more accurate than emulated half precision. Where half precision is native (CUDA, AMX/AVX512 CPUs) it runs as
asked, in the channels_last layout their fast half-precision convolutions use. ``vae.compute_dtype``
overrides the dtype.

float16 has a small range: some VAEs (SDXL's original one, famously) overflow to inf/NaN in their decoder.
:func:`compute` checks a half-precision result and, when it is not finite, computes it again
in float32; the cost is one finite-check per call and, only when it overflows, the float32 call.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def _probe_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` convolutions and GEMMs natively (oneDNN's own capability checks)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # older builds: fall back to the instruction-set flags
        cpu = torch.backends.cpu.get_cpu_capability()
        return dtype == torch.bfloat16 and cpu.startswith("AVX512")


# Probed once, at import: traced code (torch.compile) only reads this table. dynamo cannot trace the probes
# themselves (they return a bool from an operator).
_CPU_NATIVE: dict[torch.dtype, bool] = {dtype: _probe_cpu(dtype) for dtype in _HALF}


def _cpu_supports(dtype: torch.dtype) -> bool:
    return _CPU_NATIVE[dtype]


def fast_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to compute in for weights of ``dtype`` on ``device``: ``dtype`` itself unless it is a half
    precision that ``device`` only emulates (then float32)."""
    if dtype in _HALF and device.type == "cpu" and not _cpu_supports(dtype):
        return torch.float32
    return dtype


@contextlib.contextmanager
def parameters_in(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, ``module``'s floating-point parameters and buffers are ``dtype`` copies (gradients flow
    back to the originals); they are restored on exit. Not for modules shared by concurrent threads."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                for name, value in table.items():
                    if value is not None and value.is_floating_point() and value.dtype != dtype:
                        swapped.append((table, name, value))
                        table[name] = value.to(dtype)
        yield
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value


def run_in(modules: list[nn.Module], dtype: torch.dtype, fn: Callable[[torch.Tensor], torch.Tensor],
           x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed in ``dtype`` (``modules``' weights cast for the call), returned in ``x``'s dtype."""
    if x.dtype == dtype and all(p.dtype == dtype for m in modules for p in m.parameters()):
        return fn(x)
    with _parameters_of_all_in(modules, dtype):
        return fn(x.to(dtype)).to(x.dtype)


@contextlib.contextmanager
def _parameters_of_all_in(modules: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(parameters_in(m, dtype))
        yield


def fast_memory_format(dtype: torch.dtype, device: torch.device) -> torch.memory_format:
    """channels_last for half precision computed natively (the layout cuDNN's and oneDNN's fast half-precision
    convolutions use; in float32 on the CPU it measured no faster here), else contiguous."""
    if dtype in _HALF and fast_compute_dtype(dtype, device) == dtype:
        return torch.channels_last
    return torch.contiguous_format


def compute(modules: list[nn.Module], dtype: torch.dtype, fn: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor, what: str) -> torch.Tensor:
    """``fn(x)`` in ``dtype`` (see :func:`run_in`) and its fast layout (a contiguous result); a float16 result
    that is not finite although ``x`` is gets computed again in float32."""
    if fast_memory_format(dtype, x.device) == torch.channels_last and x.ndim == 4:
        fn = _channels_last(fn)
    out = run_in(modules, dtype, fn, x)
    if dtype != torch.float16:
        return out
    if torch.compiler.is_compiling():
        # No data-dependent Python branch in a traced graph: both ways are in it, torch.cond picks one at run time.
        # The float32 weights are cast outside it (a branch may not swap module attributes).
        with _parameters_of_all_in(modules, torch.float32):
            return torch.cond(_overflowed(out, x), lambda o, v: fn(v.float()).to(v.dtype), lambda o, v: o.clone(),
                              (out, x))
    if not bool(_overflowed(out, x)):
        return out
    _warn_overflow(what)
    del out
    return run_in(modules, torch.float32, fn, x)


def _overflowed(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool: ``out`` has inf/NaN although ``x`` has none."""
    return torch.isfinite(x).all() & ~torch.isfinite(out).all()


def _channels_last(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    # The input's layout propagates: convolutions keep channels_last when their input has it.
    return lambda x: fn(x.contiguous(memory_format=torch.channels_last)).contiguous()


@functools.cache
def _warn_overflow(what: str) -> None:
    warnings.warn(f"float16 {what} overflowed (inf/NaN); recomputed in float32. This model is not float16-safe: "
                  "use bfloat16 or float32 weights, or an fp16-fixed VAE, to avoid the second pass",
                  RuntimeWarning, stacklevel=4)
