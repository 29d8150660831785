"""Quantizer health: find quantizers whose range collapsed, which silently zero a layer's input or weights.

Activation quantizer: a PACT clip alpha at ~0 (everything clipped to 0), a moving-average abs-max of 0 after
calibration (scale 0: the layer sees only zeros), or a non-finite range. Weight quantizer: output channels whose
weights are all 0 (scale 0). Reported as warnings, in TensorBoard (quant/collapsed) and in summary.json.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from act.quant.modules import QUANT_MODULES

TINY = 1e-6


@torch.no_grad()
def collapsed_quantizers(model: nn.Module, tiny: float = TINY) -> Dict[str, str]:
    """{quantizer name: what collapsed} for every unhealthy quantizer of `model` (empty when all are fine)."""
    out: Dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QUANT_MODULES):
            continue
        q = m.input_quantizer
        if bool(q.initialized):
            r = float(q.running_absmax)
            if not math.isfinite(r):
                out[f"{name}.input_quantizer"] = f"moving-average range is {r}"
            elif r <= tiny:
                out[f"{name}.input_quantizer"] = f"moving-average range collapsed to {r:.3g} (scale 0)"
            if q.pact and q.alpha_ready:
                a = float(q.alpha.detach().abs())
                if not math.isfinite(a):
                    out[f"{name}.input_quantizer"] = f"PACT alpha is {a}"
                elif a <= tiny:
                    out[f"{name}.input_quantizer"] = f"PACT alpha collapsed to {a:.3g} (input clipped to 0)"
        w = m.weight.detach()
        dims = [d for d in range(w.dim()) if d != 0]
        amax = w.abs().amax(dim=dims) if dims else w.abs()
        if not bool(torch.isfinite(amax).all()):
            out[f"{name}.weight_quantizer"] = "non-finite weights"
        else:
            dead = int((amax <= tiny * 1e-2).sum())
            if dead == amax.numel():
                out[f"{name}.weight_quantizer"] = "all weights are 0 (scale 0)"
            elif dead and m.weight_quantizer.per_channel:
                out[f"{name}.weight_quantizer"] = f"{dead}/{amax.numel()} output channels have all-zero weights"
    return out


def health_report(model: nn.Module) -> Dict[str, object]:
    bad = collapsed_quantizers(model)
    return {"collapsed": len(bad), "quantizers": bad}


def format_report(bad: Dict[str, str], limit: int = 10) -> List[str]:
    lines = [f"  {k}: {v}" for k, v in list(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more (see summary.json)")
    return lines
