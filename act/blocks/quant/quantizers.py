"""Symmetric INT8 fake quantizers built on torch's `fake_quantize_per_*` ops.

Those ops export straight to ONNX QuantizeLinear/DequantizeLinear (int8, zero point 0), and their gradient is the
straight-through estimator (1 inside the representable range, 0 outside), so what trains is exactly what exports.
Values are quantized to [-128, 127] with scale = range / 127; a tensor's abs-max therefore maps to +-127. Weights can
be kept within 7 bits (`max_int=63`, scale = abs-max / 63: every integer in [-63, 63], still stored as int8): what CPUs
without VNNI need, whose u8 x s8 kernels sum products in pairs into 16 bits (docs/deployment.md).
"""

from __future__ import annotations

import torch
from torch import nn

from act.blocks.quant import fused

QMIN, QMAX = -128, 127
EPS = 1e-8


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """The fake-quant kernels take float32; a no-op (and no Cast in the ONNX) when x already is."""
    return x if x.dtype == torch.float32 else x.float()


class _AbsMaxFakeQuantPerChannel(torch.autograd.Function):
    """Training path of the per-channel weight fake-quant with its live abs-max scale: the same values as
    torch.fake_quantize_per_channel_affine (x * (1/s), round half-even, clamp, * s, all in float32) without that op's
    host-side zero-point checks (two GPU syncs per call, which stall every step). Every weight lies inside its abs-max
    range, so the op's straight-through mask is all ones: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * w.dim()
        shape[axis] = -1
        s = scale.view(shape)
        return torch.round(w * (1.0 / s)).clamp_(QMIN, QMAX).mul_(s)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _PactFakeQuant(torch.autograd.Function):
    """fake_quantize(clamp(x, -|alpha|, |alpha|)) with the gradients of that composition (STE inside the clip and
    the quantization range; the clipped elements' gradient to alpha, +1 above and -1 below) but a cheap backward:
    one int8 code per element is kept instead of autograd's clamp masks (which cost ~10 kernels per quantizer)."""

    @staticmethod
    def forward(ctx, x, alpha, scale, zp, a_abs, enabled):
        """a_abs: |alpha| (detached), computed once by the caller; enabled: the op's fake_quant_enabled flag (a
        cached constant)."""
        a = a_abs.to(x.dtype)
        ctx.x_dtype = x.dtype
        if fused.ENABLED:  # train.compile: quantizers -- one compiled pass instead of the ops below
            out, code = fused.forward(x, a, scale)
            ctx.save_for_backward(code, alpha)
            ctx.fused = True
            return out
        ctx.fused = False
        xc = torch.clamp(x, -a, a)
        out, mask = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            _as_float32(xc), scale, zp, enabled, QMIN, QMAX)
        # code: +1 clipped above, -1 clipped below, 0 inside the clip; times the quantizer's in-range mask, and
        # 2 for elements outside it (no gradient anywhere)
        code = torch.sign(x - xc).to(torch.int8)
        code.masked_fill_(~mask, 2)
        ctx.save_for_backward(code, alpha)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        code, alpha = ctx.saved_tensors
        if ctx.fused:
            grad_x, ga = fused.backward(g, code)
            ga = (ga * torch.sign(alpha.detach())).to(alpha.dtype) if ctx.needs_input_grad[1] else None
            return grad_x.to(ctx.x_dtype), ga, None, None, None, None
        grad_x = g * (code == 0)
        ga = None
        if ctx.needs_input_grad[1]:
            clipped = torch.where(code.abs() == 1, code, 0)
            ga = (g.float() * clipped).sum() * torch.sign(alpha.detach())
            ga = ga.to(alpha.dtype)
        return grad_x.to(ctx.x_dtype), ga, None, None, None, None


class WeightQuantizer(nn.Module):
    """Abs-max of the live weight, per output channel (axis 0) or per tensor. Stateless: the scale follows the
    weight as it trains, so it exports with the final weights' ranges."""

    def __init__(self, per_channel: bool = True, axis: int = 0, max_int: int = QMAX):
        super().__init__()
        self.per_channel = per_channel
        self.axis = axis
        self.max_int = int(max_int)  # 127: full int8; 63: integers within 7 bits (quant.weight.range int7)
        self.enabled = True
        self.frozen_scale = None  # set by freeze(): a constant scale, so the export holds no range arithmetic

    def freeze(self, w: torch.Tensor) -> None:
        self.frozen_scale = self.scale(w)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().float()
        if self.per_channel:
            dims = [d for d in range(w.dim()) if d != self.axis]
            amax = w.abs().amax(dim=dims)
        else:
            amax = w.abs().amax()
        return (amax / getattr(self, "max_int", QMAX)).clamp_min(EPS)  # (checkpoints from before max_int: 127)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self.frozen_scale if self.frozen_scale is not None else self.scale(w)
        wf = _as_float32(w)
        if self.per_channel and self.frozen_scale is None and self.training and not torch.jit.is_tracing() \
                and not torch.onnx.is_in_onnx_export():
            out = _AbsMaxFakeQuantPerChannel.apply(wf, s, self.axis)
        elif self.per_channel:
            zp = torch.zeros(s.shape, dtype=torch.int32, device=w.device)
            out = torch.fake_quantize_per_channel_affine(wf, s, zp, self.axis, QMIN, QMAX)
        else:
            out = torch.fake_quantize_per_tensor_affine(wf, s, torch.zeros((), dtype=torch.int32, device=w.device),
                                                        QMIN, QMAX)
        return out if out.dtype == w.dtype else out.to(w.dtype)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, axis={self.axis}, max_int={getattr(self, 'max_int', QMAX)}"


class ActivationQuantizer(nn.Module):
    """Per-tensor moving-average abs-max with an optional PACT clip.

    Training: x is clipped to [-alpha, alpha] (alpha learned; its gradient comes through the clip), the batch abs-max
    of the clipped x updates `running_absmax` as an EMA (`ema_rate` of the old value), and x is fake-quantized with
    range r = min(running_absmax, alpha). Eval and export: the same fake-quant with r, no clip needed (QuantizeLinear
    saturates at r), so the ONNX holds a pure Q/DQ pair with scale r / 127.

    Modes: "quant" (default), "observe" (update the EMA, pass x through in float; used for calibration), "off".
    """

    def __init__(self, ema_rate: float = 0.9, pact: bool = True, alpha_init: float | None = None):
        super().__init__()
        self.ema_rate = float(ema_rate)
        self.pact = bool(pact)
        self.register_buffer("running_absmax", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        if self.pact:
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init) if alpha_init is not None else 0.0))
            self.register_buffer("alpha_set", torch.tensor(alpha_init is not None))
        # Python mirror of `alpha_set`: reading a CUDA buffer in forward would sync the GPU at every quantizer
        self._alpha_ready = self.pact and alpha_init is not None
        self.mode = "quant"
        self.frozen_scale = None  # set by freeze() for export: a constant scale
        self.reduce_fn = None  # set under DDP to all-reduce the batch abs-max (max over ranks)
        # A quantizer shared by several places of the graph (act.blocks.quant.placement: one scale for all inputs of a
        # Concat, ...) is called that many times per forward; its moving average then takes one step per forward,
        # with the max over all those calls, and every call of the step quantizes with the same scale.
        self.calls_per_step = 1
        self._pending_max = None
        self._pending_calls = 0

    @property
    def alpha_ready(self) -> bool:
        return getattr(self, "_alpha_ready", False)

    def mark_alpha_ready(self) -> None:
        self.alpha_set.fill_(True)
        self._alpha_ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.pact:
            self._alpha_ready = bool(self.alpha_set)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_alpha_ready" not in self.__dict__:
            self._alpha_ready = bool(self.pact and bool(self.alpha_set)) if "alpha_set" in self._buffers else False

    # -- state -------------------------------------------------------------------------------------------------
    def range(self, a_abs: torch.Tensor | None = None) -> torch.Tensor:
        r = self.running_absmax
        if self.alpha_ready:
            r = torch.minimum(r, self.alpha.detach().abs() if a_abs is None else a_abs)
        return r

    def scale(self, a_abs: torch.Tensor | None = None) -> torch.Tensor:
        """range / 127 (at least EPS); a_abs: |alpha| if the caller has it already."""
        return (self.range(a_abs).float() / QMAX).clamp_min(EPS)

    def freeze(self) -> None:
        self.frozen_scale = self.scale().detach().clone()

    def init_alpha_from_range(self, ratio: float = 1.0) -> None:
        if self.pact:
            with torch.no_grad():
                self.alpha.fill_(float(self.running_absmax) * ratio)
                self.alpha_set.fill_(True)
            self._alpha_ready = True

    @property
    def shared(self) -> bool:
        return getattr(self, "calls_per_step", 1) > 1

    def _zero_point(self, device) -> torch.Tensor:
        zp = self.__dict__.get("_zp")
        if zp is None or zp.device != device:
            zp = torch.zeros((), dtype=torch.int32, device=device)
            self.__dict__["_zp"] = zp  # a cached constant (not state): no allocation and fill per call
        return zp

    def _enabled_flag(self, device) -> torch.Tensor:
        on = self.__dict__.get("_on")
        if on is None or on.device != device:
            on = torch.ones((), dtype=torch.long, device=device)
            self.__dict__["_on"] = on  # cached like the zero point
        return on

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, clip: torch.Tensor | None = None) -> None:
        batch_max = torch.linalg.vector_norm(x.detach(), float("inf")).float()  # abs-max in one pass, no |x| copy
        if clip is not None:
            batch_max = torch.minimum(batch_max, clip.float())
        if self.shared:  # accumulate the max over this forward's calls; update once, at the last one
            prev = self._pending_max
            self._pending_max = batch_max if prev is None else torch.maximum(prev, batch_max)
            self._pending_calls += 1
            if self._pending_calls < self.calls_per_step:
                return
            batch_max, self._pending_max, self._pending_calls = self._pending_max, None, 0
        if self.reduce_fn is not None:
            batch_max = self.reduce_fn(batch_max)
        # EMA: running + (1 - rate) * (batch - running); the first observation takes the batch's value
        w = torch.where(self.initialized, 1.0 - self.ema_rate, 1.0)
        new = torch.lerp(self.running_absmax, batch_max, w)
        # a non-finite batch (a NaN/Inf step, skipped by train.nan_policy) never moves the range
        self.running_absmax.copy_(torch.where(torch.isfinite(batch_max), new, self.running_absmax))
        self.initialized.fill_(True)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.training:
                self._observe(x)
            return x
        use_clip = self.training and self.alpha_ready
        zp = self._zero_point(x.device)
        if use_clip and self.frozen_scale is None:
            # the batch abs-max after the clip is min(abs-max of x, |alpha|): observe first, then clip+quantize fused
            a_abs = self.alpha.detach().abs()
            on = self._enabled_flag(x.device)
            if self.shared:  # every call of a shared quantizer uses the step's scale from before its update
                s = self.scale(a_abs)
                self._observe(x, clip=a_abs)
                return _PactFakeQuant.apply(x, self.alpha, s, zp, a_abs, on)
            self._observe(x, clip=a_abs)
            return _PactFakeQuant.apply(x, self.alpha, self.scale(a_abs), zp, a_abs, on)
        if use_clip:
            a = self.alpha.abs().to(x.dtype)
            x = torch.clamp(x, -a, a)
        s = self.frozen_scale
        if self.training and self.shared:
            s = self.scale() if s is None else s  # the scale of this step, before the step's update
            self._observe(x)
        elif self.training:
            self._observe(x)
        if s is None:
            s = self.scale()
        out = torch.fake_quantize_per_tensor_affine(_as_float32(x), s, zp, QMIN, QMAX)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"ema_rate={self.ema_rate}, pact={self.pact}, mode={self.mode}"
