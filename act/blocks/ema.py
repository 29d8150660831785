"""Weight EMA of the student: an exponential moving average of its weights and floating buffers (quantizer ranges,
PACT clips), as Ultralytics' ModelEMA: the decay ramps up as `decay * (1 - exp(-updates / tau))`, so the average
follows the student closely at first and smooths more as training goes on.

With `train.ema` the run evaluates, keeps (best.pt) and exports the average instead of the raw student; last.pt
carries both, so a resumed run continues the same average.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float, tau: float):
        self.decay, self.tau = decay, tau
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for m in self.module.modules():  # (the student's capture hooks and DDP reductions are not the average's)
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            if getattr(m, "reduce_fn", None) is not None:
                m.reduce_fn = None
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs(model)

    def _pairs(self, model: nn.Module) -> None:
        """The tensors to average (floating parameters and buffers) and to copy (integer / bool buffers), paired
        with the student's, looked up once: one fused lerp per step, no host sync."""
        ours = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            raise ValueError("WeightEMA: the model's tensors changed (a pruning step?): make a new average")
        self.model = model
        self.avg = [(a, b) for a, b in zip(ours, theirs) if a.dtype.is_floating_point]
        self.copy = [(a, b) for a, b in zip(ours, theirs) if not a.dtype.is_floating_point]

    @property
    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step of the student."""
        self.updates += 1
        if self.avg:
            torch._foreach_lerp_([a for a, _ in self.avg], [b.detach() for _, b in self.avg], 1.0 - self.current_decay)
        for a, b in self.copy:
            a.copy_(b)

    def state_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        self.updates = int(st["updates"])
        self.module.load_state_dict(st["model"])
