"""Symmetric INT8 fake quantizers built on torch's `fake_quantize_per_*` ops.

Those ops export straight to ONNX QuantizeLinear/DequantizeLinear (int8, zero point 0), and their gradient is the
straight-through estimator (1 inside the representable range, 0 outside), so what trains is exactly what exports.
Values are quantized to [-128, 127] with scale = range / 127; a tensor's abs-max therefore maps to +-127.
"""

from __future__ import annotations

import torch
from torch import nn

QMIN, QMAX = -128, 127
EPS = 1e-8


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """The fake-quant kernels take float32; a no-op (and no Cast in the ONNX) when x already is."""
    return x if x.dtype == torch.float32 else x.float()


class WeightQuantizer(nn.Module):
    """Abs-max of the live weight, per output channel (axis 0) or per tensor. Stateless: the scale follows the
    weight as it trains, so it exports with the final weights' ranges."""

    def __init__(self, per_channel: bool = True, axis: int = 0):
        super().__init__()
        self.per_channel = per_channel
        self.axis = axis
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
        return (amax / QMAX).clamp_min(EPS)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self.frozen_scale if self.frozen_scale is not None else self.scale(w)
        wf = _as_float32(w)
        if self.per_channel:
            zp = torch.zeros(s.shape, dtype=torch.int32, device=w.device)
            out = torch.fake_quantize_per_channel_affine(wf, s, zp, self.axis, QMIN, QMAX)
        else:
            out = torch.fake_quantize_per_tensor_affine(wf, s, torch.zeros((), dtype=torch.int32, device=w.device),
                                                        QMIN, QMAX)
        return out if out.dtype == w.dtype else out.to(w.dtype)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, axis={self.axis}"


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
        # A quantizer shared by several places of the graph (act.quant.placement: one scale for all inputs of a
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
    def range(self) -> torch.Tensor:
        r = self.running_absmax
        if self.alpha_ready:
            r = torch.minimum(r, self.alpha.detach().abs())
        return r

    def scale(self) -> torch.Tensor:
        return (self.range().float() / QMAX).clamp_min(EPS)

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

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        batch_max = x.detach().abs().amax().float()
        if self.shared:  # accumulate the max over this forward's calls; update once, at the last one
            prev = self._pending_max
            self._pending_max = batch_max if prev is None else torch.maximum(prev, batch_max)
            self._pending_calls += 1
            if self._pending_calls < self.calls_per_step:
                return
            batch_max, self._pending_max, self._pending_calls = self._pending_max, None, 0
        if self.reduce_fn is not None:
            batch_max = self.reduce_fn(batch_max)
        new = torch.where(self.initialized, self.ema_rate * self.running_absmax + (1 - self.ema_rate) * batch_max,
                          batch_max)
        self.running_absmax.copy_(new)
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
        if use_clip:
            a = self.alpha.abs().to(x.dtype)
            x = torch.minimum(torch.maximum(x, -a), a)
        s = self.frozen_scale
        if self.training and self.shared:
            s = self.scale() if s is None else s  # the scale of this step, before the step's update
            self._observe(x)
        elif self.training:
            self._observe(x)
        if s is None:
            s = self.scale()
        zp = torch.zeros((), dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_tensor_affine(_as_float32(x), s, zp, QMIN, QMAX)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"ema_rate={self.ema_rate}, pact={self.pact}, mode={self.mode}"
