"""The distillation losses between a student output `s` and the teacher's `t` at one node.

`LOSSES` maps a loss name (`distill.losses.<branch>.type` in the config) to a function
`(s, t, spec, per_position, reg_max) -> loss` (`spec`: the config's LossSpec: temperature, axis, ...); with
`per_position` it returns a (B, H, W) map that act.distill weights by the teacher's class score, else the mean. A new
loss is a function here plus its entry in `LOSSES`.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F


def _split_dfl(x: torch.Tensor, reg_max: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, 4, c // 4, h, w)  # (B, 4 sides, bins, H, W)


def soft_label_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, axis: str, reg_max: int = 16,
                    per_position: bool = False):
    """KL(teacher || student) of softmax(x / T) over `axis`, times T^2 (cross-entropy minus the teacher's entropy:
    same gradient, and 0 when they agree). per_position: (B, H, W) map instead of the mean (axis channel / dfl)."""
    s, t = s.float(), t.float()
    if axis == "dfl":
        s, t, dim = _split_dfl(s, reg_max), _split_dfl(t, reg_max), 2
    elif axis == "channel":
        dim = 1
    else:  # spatial
        s, t, dim = s.flatten(2), t.flatten(2), 2
    log_ps = F.log_softmax(s / temperature, dim=dim)
    log_pt = F.log_softmax(t / temperature, dim=dim)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=dim) * temperature**2
    if per_position:
        return kl.mean(dim=1) if axis == "dfl" else kl  # dfl: (B, 4 sides, H, W) -> mean of the sides
    return kl.mean()


def sigmoid_soft_label_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, per_position: bool = False):
    """Binary KL between sigmoid(t / T) and sigmoid(s / T), per element, times T^2."""
    s, t = s.float() / temperature, t.float() / temperature
    pt = torch.sigmoid(t)
    kl = (pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))) * temperature**2
    return kl.mean(dim=1) if per_position else kl.mean()


def l2_loss(s: torch.Tensor, t: torch.Tensor, per_position: bool = False):
    if per_position:
        return (s.float() - t.float()).pow(2).mean(dim=1)
    return F.mse_loss(s.float(), t.float())


def feature_l2(s: torch.Tensor, t: torch.Tensor, per_position: bool = False):
    """Squared error relative to the teacher's mean square over the batch: the same scale at every layer (1.0 for a
    student that outputs zeros)."""
    return l2_loss(s, t, per_position) / t.detach().float().pow(2).mean().clamp_min(1e-8)


def teacher_score_weights(cls_logits: torch.Tensor) -> torch.Tensor:
    """(B, H, W) weight of each anchor position: the teacher's highest sigmoid class probability there."""
    return torch.sigmoid(cls_logits.detach().float()).amax(dim=1)


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average over positions; the denominator is at least 1 (one confident anchor), so a batch with no
    object at this level contributes little instead of magnifying its background."""
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def _soft_label(s, t, spec, per_position: bool = False, reg_max: int = 16):
    axis = spec.axis
    if axis == "dfl" and s.shape[1] % 4:
        axis = "channel"
    return soft_label_loss(s, t, spec.temperature, axis, reg_max, per_position)


LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "soft_label": _soft_label,
    "bce": lambda s, t, spec, per_position=False, reg_max=16: sigmoid_soft_label_loss(s, t, spec.temperature,
                                                                                       per_position),
    "l2": lambda s, t, spec, per_position=False, reg_max=16: l2_loss(s, t, per_position),
}
