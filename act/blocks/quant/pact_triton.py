"""The PACT fake-quant of training as two hand-written Triton kernels, one pass over the activation each.

Forward: clip to [-a, a], x * (1/s), round half-even, clamp to [-128, 127], * s, plus one int8 code per element (0:
the gradient goes to x, +1/-1: clipped above/below, the gradient goes to alpha, 2: outside the quantization range,
no gradient). Backward: the masked gradient of x and alpha's gradient (the sum of the clipped elements' gradient
times their side) in the same pass, from per-block partial sums (summed by one small torch op, so the result does not
depend on the order blocks finish in). Inductor's version of the same (act.blocks.quant.fused) needs a reduction kernel
beside the element-wise one and ran that reduction far from the memory bandwidth (docs/scale.md).

The output, the code and the gradient of x are dense in x's dimension order (contiguous, channels_last, ...); x and
the incoming gradient may be strided 4-D views (C2f's channel chunks, a gradient in another layout), read in place
through their strides. Values equal the eager path's bit for bit; round
half-even is done with floor (exact in float32), so the same code runs in Triton's CPU interpreter
(TRITON_INTERPRET=1), which is how the tests check it without a GPU.
"""

from __future__ import annotations

from typing import Tuple

import torch

try:  # triton ships with CUDA builds of torch; act[...] never needs it elsewhere
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only builds of torch
    triton = None

AVAILABLE = triton is not None
BLOCK = 4096
NUM_WARPS = 8

if AVAILABLE:

    @triton.jit
    def _offsets(pid, d1, d2, d3, s0, s1, s2, s3, STRIDED: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
        """Flat indices of this block in the dense output, and where each element sits in a strided input (4-D:
        sizes d0..d3, strides s0..s3, in the output's memory order)."""
        if I64:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        if STRIDED:
            i3 = offs % d3
            t = offs // d3
            i2 = t % d2
            t = t // d2
            i1 = t % d1
            i0 = t // d1
            src = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
        else:
            src = offs
        return offs, src

    @triton.jit
    def _forward_kernel(x_ptr, a_ptr, s_ptr, inv_ptr, out_ptr, code_ptr, n, d1, d2, d3, s0, s1, s2, s3,
                        STRIDED: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
        offs, src = _offsets(tl.program_id(0), d1, d2, d3, s0, s1, s2, s3, STRIDED, I64, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + src, mask=m, other=0.0)
        a = tl.load(a_ptr)
        s = tl.load(s_ptr)
        inv = tl.load(inv_ptr)
        xc = tl.minimum(tl.maximum(x, -a, propagate_nan=tl.PropagateNan.ALL), a, propagate_nan=tl.PropagateNan.ALL)
        y = xc.to(tl.float32) * inv
        # round half to even, exactly: y - floor(y) is exact in float32 below 2**23, where y is not yet an integer
        # (launched with enable_fp_fusion=False: an FMA would take y - floor(y) from the unrounded product)
        f = tl.floor(y)
        d = y - f
        odd = f - 2.0 * tl.floor(f * 0.5)
        r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
        q = tl.where(tl.abs(y) >= 8388608.0, y, r)
        inside = (q >= -128.0) & (q <= 127.0)
        out = tl.minimum(tl.maximum(q, -128.0), 127.0) * s
        side = (x > a).to(tl.int8) - (x < -a).to(tl.int8)
        code = tl.where(inside, side, 2).to(tl.int8)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(code_ptr + offs, code, mask=m)

    @triton.jit
    def _backward_kernel(g_ptr, code_ptr, gx_ptr, part_ptr, n, d1, d2, d3, s0, s1, s2, s3,
                         STRIDED: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs, src = _offsets(pid, d1, d2, d3, s0, s1, s2, s3, STRIDED, I64, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + src, mask=m, other=0.0)
        c = tl.load(code_ptr + offs, mask=m, other=2)
        tl.store(gx_ptr + offs, tl.where(c == 0, g, 0.0).to(gx_ptr.dtype.element_ty), mask=m)
        side = tl.where((c == 1) | (c == -1), c.to(tl.float32), 0.0)
        tl.store(part_ptr + pid, tl.sum(g.to(tl.float32) * side, axis=0))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dimension order (contiguous, channels_last, ...)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    expected = 1
    for d in reversed(order):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _order(t: torch.Tensor):
    """t's dimensions from the outermost to the innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d) if t.size(d) != 1 else 0, d))


def _empty_dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of t's shape, dense in t's dimension order (t's own strides when t is dense)."""
    if _dense(t):
        return torch.empty_like(t, dtype=dtype)
    order = _order(t)
    inv = [order.index(d) for d in range(t.dim())]
    return torch.empty([t.size(d) for d in order], dtype=dtype, device=t.device).permute(inv)


def _geometry(src: torch.Tensor, dense: torch.Tensor):
    """Launch arguments that read `src` in `dense`'s flat order: (strided?, d1, d2, d3, s0, s1, s2, s3)."""
    same = all(src.stride(d) == dense.stride(d) for d in range(src.dim()) if src.size(d) != 1)
    if same:
        return False, 1, 1, 1, 0, 0, 0, 0
    order = _order(dense)
    sizes = [dense.size(d) for d in order]
    strides = [src.stride(d) for d in order]
    return True, sizes[1], sizes[2], sizes[3], strides[0], strides[1], strides[2], strides[3]


def _prepare(src: torch.Tensor) -> torch.Tensor:
    """4-D tensors are read through their strides; others must be dense (else copied)."""
    return src if (src.dim() == 4 or _dense(src)) else src.contiguous()


def _blocks(n: int) -> int:
    return max(1, (n + BLOCK - 1) // BLOCK)


def _launch(kernel, n, geometry, *tensors, i64_span: int):
    strided, *geo = geometry
    kernel[(_blocks(n),)](*tensors, n, *geo, STRIDED=strided, I64=i64_span >= 2**31 - BLOCK, BLOCK=BLOCK,
                          num_warps=NUM_WARPS, enable_fp_fusion=False)


def _span(t: torch.Tensor) -> int:
    return max(t.numel(), 1 + sum((t.size(d) - 1) * t.stride(d) for d in range(t.dim())))


def pact_forward(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out in x.dtype, int8 code), dense in x's dimension order. a: |alpha| in x.dtype (0-dim); scale: float32
    (0-dim). x may be a strided 4-D view (a channel chunk): it is read in place, not copied."""
    x = _prepare(x)
    out = _empty_dense(x, x.dtype)
    code = torch.empty_like(out, dtype=torch.int8)
    s = scale.float().reshape(())
    inv = 1.0 / s  # the eager op's inverse scale, computed the same way
    n = x.numel()
    if n:
        _launch(_forward_kernel, n, _geometry(x, out), x, a.to(x.dtype).reshape(()), s, inv, out, code,
                i64_span=_span(x))
    return out, code


def pact_backward(g: torch.Tensor, code: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gradient of x, dense in code's layout; unsigned float32 gradient of |alpha|). g may be strided."""
    g = _prepare(g)
    if g.dim() != 4 and g.stride() != code.stride():
        g, code = g.contiguous(), code.contiguous()
    gx = torch.empty_like(code, dtype=g.dtype)
    n = g.numel()
    part = torch.zeros(_blocks(n), dtype=torch.float32, device=g.device)
    if n:
        _launch(_backward_kernel, n, _geometry(g, code), g, code, gx, part, i64_span=_span(g))
    return gx, part.sum()
