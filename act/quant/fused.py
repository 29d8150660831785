"""Compiled kernels for the PACT fake-quant of training (`train.compile: quantizers`).

Eager PyTorch runs the clip, the fake-quant, the gradient code and the masked backward of every activation quantizer
as separate passes over the activation (docs/scale.md: about half of the step's device time). Here the forward is one
element-wise function (output + one int8 code per element) and the backward another (masked gradient + alpha's sum),
each compiled once by Inductor with dynamic shapes, so every quantizer of the model reuses the same two kernels.
The values are those of the eager path (x * (1/s), round half-even, clamp to [-128, 127], * s; the same masks).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

QMIN, QMAX = -128, 127

ENABLED = False
_KERNELS: Optional[Tuple[Callable, Callable]] = None


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


def kernels() -> Tuple[Callable, Callable]:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = (torch.compile(pact_fq_forward, dynamic=True, fullgraph=True),
                    torch.compile(pact_fq_backward, dynamic=True, fullgraph=True))
    return _KERNELS


def set_enabled(on: bool) -> None:
    global ENABLED
    ENABLED = bool(on)
