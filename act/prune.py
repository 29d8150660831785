"""Structured channel pruning of a student with torch-pruning (DepGraph), to a target share of the teacher's MACs or
parameters.

    pruner = StructuredPruner(family, stage)            # stage: an act.config.PruneStage
    info = pruner.prune_to(student, target_macs)         # in place; returns what it did

The model family prepares the model (Ultralytics C2f/C3k2 chunk splits become two convs, see
teachers/ultralytics_prune.py) and names the modules whose channels stay (the head's last convs: the distillation
nodes; the DFL decode; attention blocks). Pruning proceeds in a few increments of torch-pruning's channel ratio,
chosen adaptively from the MACs counted after each, until the cost is within 1% above the target. MACs are counted
at the run's imgsz (attention MACs grow faster than H*W, so the ratio depends on it). Importance: L1 / L2 magnitude
of the whole dependency group, LAMP, or first-order Taylor (|w * dL/dw|) on gradients of the distillation loss that
the caller accumulated into the student's `.grad` (see `accumulate_grads`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch_pruning as tp
from torch import nn

from act.errors import ActError

TRACE_IMGSZ = 160  # MACs of a conv net scale with H*W, so their ratio does not depend on the traced size


def model_cost(model: nn.Module, imgsz: int = TRACE_IMGSZ) -> Tuple[float, int]:
    """(MACs, parameters) of one image at imgsz x imgsz, by torch-pruning's counter (a deep copy runs, in eval)."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, x)
    return float(macs), int(params)


def importance_for(kind: str, have_grads: bool):
    """The torch-pruning importance of a config name. Taylor without gradients (the first step, where the student
    still equals the teacher and the distillation loss and its gradient are 0) falls back to L2 magnitude."""
    if kind == "taylor" and have_grads:
        return tp.importance.GroupTaylorImportance()
    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    return tp.importance.GroupMagnitudeImportance(p=2)  # l2, group_norm (group L2 norm), taylor w/o grads


def accumulate_grads(model: nn.Module, loss_fn: Callable[[], torch.Tensor], batches: int) -> float:
    """Zero the student's grads, then backward `loss_fn()` `batches` times (the grads add up). Returns the mean loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(batches):
        loss = loss_fn()
        loss.backward()
        total += float(loss.detach())
    return total / max(batches, 1)


class StructuredPruner:
    """Prunes a (float, BN-folded) student in place towards a MACs or params target. One DependencyGraph per call.

    torch-pruning's channel ratio does not map linearly to MACs, and each pruner step costs a pass over all
    dependency groups, so the ratio of each step is chosen adaptively: a first guess from MACs ~ (1 - r)^2, then
    the exponent refitted from what was measured, until the cost is within `tolerance` above the target (or under
    it). Usually 2-4 steps."""

    def __init__(self, family, stage, imgsz: int = TRACE_IMGSZ, tolerance: float = 0.01, max_steps: int = 12):
        self.family = family
        self.stage = stage
        self.imgsz = imgsz
        self.tolerance = tolerance
        self.max_steps = max_steps

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.family.prepare_for_pruning(model)

    def prune_to(self, model: nn.Module, target: float, have_grads: bool = False,
                 progress: Optional[Callable[[Dict], None]] = None) -> Dict:
        """Prune until the stage's metric (macs | params, of one imgsz image) is at most target * (1 + tolerance).
        Returns {macs, params, increments, importance, reached}."""
        st = self.stage
        self.prepare(model)
        which = 0 if st.metric == "macs" else 1
        cost = model_cost(model, self.imgsz)
        start = cost[which]
        info = {"macs": cost[0], "params": cost[1], "increments": 0,
                "reached": cost[which] <= target * (1 + self.tolerance),
                "importance": "taylor" if st.importance == "taylor" and have_grads else
                ("l2" if st.importance in ("taylor", "group_norm") else st.importance)}
        if info["reached"]:
            return info
        p = next(model.parameters())
        example = torch.zeros(1, 3, TRACE_IMGSZ, TRACE_IMGSZ, device=p.device, dtype=p.dtype)
        ignored = list(self.family.prune_ignored(model)) + self._ignored_by_name(model)
        was = model.training
        cap = st.max_layer_ratio
        try:
            pruner = tp.pruner.MetaPruner(
                model, example, importance=importance_for(st.importance, have_grads),
                global_pruning=st.scope == "global", pruning_ratio=cap, max_pruning_ratio=cap,
                iterative_steps=self.max_steps, ignored_layers=ignored, round_to=st.round_to,
                forward_fn=self.family.prune_forward,
            )
        except Exception as e:  # an architecture DepGraph cannot follow
            raise ActError(f"torch-pruning could not build the dependency graph of the student: "
                           f"{type(e).__name__}: {e}") from e
        ratio, exponent = 0.0, 2.0  # channel ratio so far (of this pruner's initial widths); cost ~ (1 - r)^exponent
        for k in range(self.max_steps):
            goal = target * (1 + self.tolerance / 2) if k == 0 else target
            want = 1 - (goal / start) ** (1 / exponent)
            step = max(want - ratio, 0.005)
            ratio = min(ratio + step, cap)
            pruner.per_step_pruning_ratio[pruner.current_step + 1] = ratio
            pruner.step()
            cost = model_cost(model, self.imgsz)
            info.update(macs=cost[0], params=cost[1], increments=k + 1, channel_ratio=round(ratio, 4))
            if progress:
                progress(info)
            if cost[which] <= target * (1 + self.tolerance):
                info["reached"] = True
                break
            if ratio >= cap:
                break  # nothing more to prune within max_layer_ratio
            if 0 < cost[which] < start and ratio > 0:
                exponent = max(0.5, math.log(cost[which] / start) / math.log(1 - ratio))
        model.train(was)
        model.zero_grad(set_to_none=True)
        return info

    def _ignored_by_name(self, model: nn.Module):
        from act.quant import matches_any

        pats = list(self.stage.ignore)
        return [m for n, m in model.named_modules() if n and pats and matches_any(n, pats)]


def channel_summary(model: nn.Module) -> Dict[str, int]:
    """Output channels of every conv, by module name (for the report and tests)."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def iter_convs(model: nn.Module) -> Iterable[Tuple[str, nn.Conv2d]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
