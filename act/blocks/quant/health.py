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

from act.blocks.quant.modules import QUANT_MODULES

TINY = 1e-6


@torch.no_grad()
def collapsed_quantizers(model: nn.Module, tiny: float = TINY) -> Dict[str, str]:
    """{quantizer name: what collapsed} for every unhealthy quantizer of `model` (empty when all are fine).

    All statistics are gathered on the model's device and copied to the host once (no sync per quantizer)."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)]
    if not mods:
        return {}
    stats = []  # per module: initialized, range, alpha ready, |alpha|, finite weights, dead channels, channels
    seen = set()  # an input quantizer shared by several layers (e.g. a Concat's) is reported once, by its first
    shared = []
    for _, m in mods:
        q = m.input_quantizer
        shared.append(id(q) in seen)
        seen.add(id(q))
        pact = q.pact and q.alpha_ready
        w = m.weight.detach()
        dims = [d for d in range(w.dim()) if d != 0]
        amax = (w.abs().amax(dim=dims) if dims else w.abs()).float()
        stats.append(torch.stack([
            q.initialized.float(), q.running_absmax.float(),
            torch.tensor(float(pact), device=w.device),
            q.alpha.detach().abs().float() if pact else torch.zeros((), device=w.device),
            torch.isfinite(amax).all().float(), (amax <= tiny * 1e-2).sum().float(),
            torch.tensor(float(amax.numel()), device=w.device)]))
    table = torch.stack(stats).cpu().tolist()
    out: Dict[str, str] = {}
    for (name, m), is_shared, (init, r, pact, a, finite_w, dead, channels) in zip(mods, shared, table):
        key = f"{name}.input_quantizer"
        if init and not is_shared:
            if not math.isfinite(r):
                out[key] = f"moving-average range is {r}"
            elif r <= tiny:
                out[key] = f"moving-average range collapsed to {r:.3g} (scale 0)"
            if pact and not math.isfinite(a):
                out[key] = f"PACT alpha is {a}"
            elif pact and a <= tiny:
                out[key] = f"PACT alpha collapsed to {a:.3g} (input clipped to 0)"
        key = f"{name}.weight_quantizer"
        if not finite_w:
            out[key] = "non-finite weights"
        elif dead == channels:
            out[key] = "all weights are 0 (scale 0)"
        elif dead and m.weight_quantizer.per_channel:
            out[key] = f"{int(dead)}/{int(channels)} output channels have all-zero weights"
    return out


def health_report(model: nn.Module) -> Dict[str, object]:
    bad = collapsed_quantizers(model)
    return {"collapsed": len(bad), "quantizers": bad}


def format_report(bad: Dict[str, str], limit: int = 10) -> List[str]:
    lines = [f"  {k}: {v}" for k, v in list(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more (see summary.json)")
    return lines


class CollapseWatch:
    """Warns once per quantizer when its range collapses during training; logs the count (quant/collapsed)."""

    def __init__(self):
        self.seen: Dict[str, str] = {}

    def check(self, model: nn.Module, writer, it: int, write=print) -> Dict[str, str]:
        bad = collapsed_quantizers(model)
        new = {k: v for k, v in bad.items() if k not in self.seen}
        self.seen = bad
        if writer is not None:
            writer.add_scalar("quant/collapsed", len(bad), it)
        if new:
            write("\n".join([f"act: warning: {len(new)} quantizer range(s) collapsed at iteration {it}:"]
                            + format_report(new)))
        return bad
