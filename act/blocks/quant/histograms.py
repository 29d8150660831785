"""Post-training calibration of activation ranges: a histogram of |x| at every activation quantizer, and a
calibrator that turns each histogram into a clip (the quantizer's range; scale = range / 127).

    result = calibrate_ranges(model, forward_loop, method="entropy")   # forward_loop(model) runs the images
    set_ranges(model, result.ranges)                                   # moving averages and PACT alphas start here

The calibrators (histogram -> clip) are act.blocks.quant.calibrators. The histogram calibrators take two passes: the abs-max first, then a fixed-range histogram over [0, abs-max].
Activations are observed in float (all quantizers off), as in TensorRT and Model Optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
import torch
from torch import nn

from act.core.errors import ActError
from act.blocks.quant.calibrators import CALIBRATORS, amax_from_histogram  # noqa: F401 (re-exported)


@dataclass
class CalibrationResult:
    ranges: Dict[str, float]  # quantizer name -> calibrated range (abs-max clip)
    absmax: Dict[str, float]  # quantizer name -> abs-max seen over all images
    method: str

    def clipped_share(self) -> float:
        """Fraction of quantizers whose range is below their abs-max (i.e. that clip outliers)."""
        n = [r < self.absmax[k] * (1 - 1e-6) for k, r in self.ranges.items()]
        return float(np.mean(n)) if n else 0.0

    def summary(self) -> Dict[str, float]:
        ratio = [r / a for k, r in self.ranges.items() if (a := self.absmax[k]) > 0]
        return {
            "quantizers": len(self.ranges),
            "clipped_share": round(self.clipped_share(), 4),
            "mean_range_over_absmax": round(float(np.mean(ratio)), 4) if ratio else 1.0,
        }


# ---- collecting histograms with forward hooks ---------------------------------------------------------------------
class _Collector:
    """Forward pre-hooks on every activation quantizer: pass 1 keeps the abs-max of its input, pass 2 a histogram of
    |x| over [0, abs-max] (on the device; a value at the top falls in the last bin)."""

    def __init__(self, quantizers: Dict[str, nn.Module], bins: int):
        self.quantizers = quantizers
        self.bins = bins
        self.absmax: Dict[str, torch.Tensor] = {}
        self.hist: Dict[str, torch.Tensor] = {}
        self.top: Dict[str, float] = {}
        self.phase = "absmax"
        self._handles = [q.register_forward_pre_hook(self._hook(n)) for n, q in quantizers.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            a = args[0].detach().abs().float()
            if self.phase == "absmax":
                m = a.amax()
                prev = self.absmax.get(name)
                self.absmax[name] = m if prev is None else torch.maximum(prev, m)
                return
            top = self.top[name]
            if top <= 0:
                return
            h = torch.histc(a.clamp_(max=top), bins=self.bins, min=0.0, max=top)
            self.hist[name] = h if name not in self.hist else self.hist[name] + h

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def calibrate_ranges(model: nn.Module, forward_loop: Callable[[nn.Module], None], method: str = "percentile",
                     percentile: float = 99.99, bins: int = 2048) -> CalibrationResult:
    """Observe every activation quantizer's float input over `forward_loop(model)` (called once for minmax, twice
    otherwise; it must feed the same images each time) and compute each one's range with `method`. The model's
    quantizer state is not changed: apply the result with `set_ranges`."""
    if method not in CALIBRATORS:
        raise ActError(f"unknown calibrator {method!r}; expected one of {', '.join(CALIBRATORS)}")
    top, hist = _observe(model, forward_loop, bins, histograms=method != "minmax")
    return ranges_from_histograms(top, hist, method, percentile)


# ---- applying and transferring ranges -----------------------------------------------------------------------------
@torch.no_grad()
def set_ranges(model: nn.Module, ranges: Dict[str, float]) -> None:
    """Start each activation quantizer at its range: the moving average (`running_absmax`) and the PACT alpha."""
    from act.blocks.quant import activation_quantizers

    qs = activation_quantizers(model)
    if set(qs) != set(ranges):
        extra, missing = sorted(set(ranges) - set(qs)), sorted(set(qs) - set(ranges))
        raise ActError(f"the ranges do not fit this model's quantizers: {len(missing)} without a range "
                       f"{missing[:3]}, {len(extra)} unknown {extra[:3]}")
    for name, q in qs.items():
        r = float(ranges[name])
        q.running_absmax.fill_(r)
        q.initialized.fill_(True)
        if q.pact:
            q.alpha.fill_(r)
            q.mark_alpha_ready()
        q.mode = "quant"


def get_ranges(model: nn.Module) -> Dict[str, float]:
    """The range each activation quantizer quantizes with now (min of moving average and PACT alpha)."""
    from act.blocks.quant import activation_quantizers

    return {n: float(q.range()) for n, q in activation_quantizers(model).items()}


# ---- one pass of histograms, many calibrators (act.orchestrate.strategy's PTQ search) -----------------------------------------
@torch.no_grad()
def collect_histograms(model: nn.Module, forward_loop: Callable[[nn.Module], None], bins: int = 2048):
    """Like calibrate_ranges, but returns the raw statistics ({name: abs-max}, {name: histogram}) so that any number
    of calibrators can be applied with `ranges_from_histograms` without running the images again."""
    return _observe(model, forward_loop, bins, histograms=True)


def _observe(model: nn.Module, forward_loop: Callable[[nn.Module], None], bins: int, histograms: bool):
    """The float input of every activation quantizer over `forward_loop(model)`: its abs-max (first pass) and, with
    `histograms`, its histogram of |x| over [0, abs-max] (second pass). Quantizers are off meanwhile."""
    from act.blocks.quant import activation_quantizers, set_quant_mode

    quantizers = activation_quantizers(model)
    if not quantizers:
        raise ActError("the model has no activation quantizers to calibrate (was it quantized?)")
    was_training = model.training
    col = _Collector(quantizers, bins)
    set_quant_mode(model, "off")
    model.eval()
    try:
        forward_loop(model)
        missing = sorted(set(quantizers) - set(col.absmax))
        if missing:
            raise ActError(f"calibration saw no input at {len(missing)} quantizers (e.g. {missing[0]}); did the "
                           f"forward loop run any image?")
        col.top = {n: float(v) for n, v in col.absmax.items()}
        if histograms:
            col.phase = "hist"
            forward_loop(model)
    finally:
        col.remove()
        set_quant_mode(model, "quant")
        model.train(was_training)
    return col.top, {n: h.cpu().numpy() for n, h in col.hist.items()}


def ranges_from_histograms(top: Dict[str, float], hist: Dict[str, np.ndarray], method: str,
                           percentile: float = 99.99) -> CalibrationResult:
    if method not in CALIBRATORS:
        raise ActError(f"unknown calibrator {method!r}; expected one of {', '.join(CALIBRATORS)}")
    ranges = {n: (t if hist.get(n) is None else amax_from_histogram(hist[n], t, method, percentile))
              for n, t in top.items()}
    return CalibrationResult(ranges=ranges, absmax=dict(top), method=method)
