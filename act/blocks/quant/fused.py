"""Fused kernels for the PACT fake-quant of training (`train.compile: quantizers`).

Eager PyTorch runs the clip, the fake-quant, the gradient code and the masked backward of every activation quantizer
as separate passes over the activation (docs/scale.md: about half of the step's device time). Fused, the forward is
one element-wise pass (output + one int8 code per element) and the backward another (masked gradient + alpha's sum).
Two implementations with the same values (x * (1/s), round half-even, clamp to [-128, 127], * s; the same masks):
  triton    act.blocks.quant.pact_triton: hand-written, one pass each way, no compile at start (float32 CUDA
            activations, where Triton is installed: the default there)
  inductor  the functions below compiled by torch.compile with dynamic shapes, so every quantizer of the model
            reuses the same two kernels (elsewhere; the backward's reduction is a second kernel)
ACT_QUANT_KERNELS=inductor|triton forces one (benchmarks compare them).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch

from act.blocks.quant import pact_triton

QMIN, QMAX = -128, 127

ENABLED = False
FORCED = ""  # ACT_QUANT_KERNELS, read by set_enabled (not on every quantizer call)
_COMPILED: Optional[Tuple[Callable, Callable]] = None


def pact_fq_forward(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor):
    """(out in x.dtype, int8 code): code 0 passes the gradient to x, +1/-1 to alpha (clipped above/below), 2 nowhere
    (outside the quantization range)."""
    xc = torch.clamp(x, -a, a)
    q = torch.round(xc.float() * (1.0 / scale))
    inside = (q >= QMIN) & (q <= QMAX)
    out = (torch.clamp(q, QMIN, QMAX) * scale).to(x.dtype)
    side = (x > a).to(torch.int8) - (x < -a).to(torch.int8)
    code = torch.where(inside, side, torch.full_like(side, 2))
    return out, code


def pact_fq_backward(g: torch.Tensor, code: torch.Tensor):
    """(gradient of x, unsigned gradient of |alpha|)."""
    gx = torch.where(code == 0, g, torch.zeros_like(g))
    clipped = torch.where((code == 1) | (code == -1), code, torch.zeros_like(code))
    ga = (g.float() * clipped.float()).sum()
    return gx, ga


def compiled() -> Tuple[Callable, Callable]:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = (torch.compile(pact_fq_forward, dynamic=True, fullgraph=True),
                     torch.compile(pact_fq_backward, dynamic=True, fullgraph=True))
    return _COMPILED


def backend(t: torch.Tensor) -> str:
    """Which implementation runs for a tensor on t's device."""
    if FORCED:
        return FORCED
    return "triton" if (t.is_cuda and t.dtype == torch.float32 and pact_triton.AVAILABLE) else "inductor"


def forward(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend(x) == "triton":
        return pact_triton.pact_forward(x, a, scale)
    return compiled()[0](x, a, scale)


def backward(g: torch.Tensor, code: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend(g) == "triton":
        return pact_triton.pact_backward(g, code)
    return compiled()[1](g, code)


def wanted(compile_setting, device: torch.device) -> bool:
    """train.compile -> whether the quantizers use these kernels: 'quantizers' always; 'auto' on CUDA where
    Triton is installed (nothing to compile there)."""
    if compile_setting == "quantizers":
        return True
    return compile_setting == "auto" and device.type == "cuda" and pact_triton.AVAILABLE


def set_enabled(on: bool) -> None:
    global ENABLED, FORCED
    ENABLED = bool(on)
    forced = os.environ.get("ACT_QUANT_KERNELS", "").strip().lower()
    FORCED = forced if forced in ("inductor", "triton") else ""
