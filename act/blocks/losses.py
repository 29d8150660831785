"""The distillation losses between a student output `s` and the teacher's `t` at one node.

Each loss is registered once, here, in the core's `LOSSES` registry (act.core.registry): its name (the config's
`distill.losses.<branch>.type`), a function `(s, t, spec, per_position, reg_max, context) -> loss` (`spec`: the
config's LossSpec: temperature, axis, ...; `context`: what a loss needs beyond its node, e.g. the teacher's box output
at the same level for `oks`), and, when it has parameters of its own, the LossSpec subclass that declares them (the
config then accepts them for that loss only: `OKSLossSpec.visibility_weight`). With `per_position` a loss returns a
(B, H, W) map that act.blocks.distill weights by the teacher's class score, else the mean. A new loss is one function
and one `LOSSES.add` line.

The head layout these losses read is the YOLOv8 / YOLO11 one: a box node holds 4 x reg_max DFL bins per anchor, a
keypoint node nk x ndim channels (x, y[, visibility logit]) per anchor, decoded as (2 * raw + anchor - 0.5) * stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from act.core.config.distill import LossSpec
from act.core.registry import LOSSES


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


def _soft_label(s, t, spec, per_position: bool = False, reg_max: int = 16, context=None):
    axis = spec.axis
    if axis == "dfl" and s.shape[1] % 4:
        axis = "channel"
    return soft_label_loss(s, t, spec.temperature, axis, reg_max, per_position)


KPT_AREA = 0.53  # box area -> keypoint "segment area" for OKS, as Ultralytics' pose metrics and COCO's crowd-free case


def dfl_distances(box: torch.Tensor) -> torch.Tensor:
    """(B, 4 * bins, H, W) DFL logits -> (B, 4, H, W) expected left, top, right, bottom distances in grid units."""
    b, c, h, w = box.shape
    p = box.float().view(b, 4, c // 4, h, w).softmax(2)
    bins = torch.arange(c // 4, device=box.device, dtype=p.dtype).view(1, 1, -1, 1, 1)
    return (p * bins).sum(2)


def oks_keypoint_loss(s: torch.Tensor, t: torch.Tensor, teacher_box: torch.Tensor, sigmas: torch.Tensor,
                      ndim: int = 3, temperature: float = 1.0, visibility_weight: float = 1.0,
                      per_position: bool = False) -> torch.Tensor:
    """Keypoint distillation where COCO scores keypoints: per anchor, 1 - OKS of the student's decoded keypoints
    against the teacher's, each keypoint weighted by the teacher's visibility, the object size taken from the
    teacher's box at the same anchor (its DFL decode; area * 0.53 as Ultralytics' kpt_iou), the per-keypoint sigmas
    of the family; plus `visibility_weight` x the sigmoid soft-label loss of the visibility logits. Decoded pixel
    positions differ by 2 * stride * (s - t) and the box area scales with stride^2, so the stride cancels: raw
    outputs suffice. s, t: (B, nk * ndim, H, W); teacher_box: (B, 4 * bins, H, W)."""
    b, c, h, w = s.shape
    nk = c // ndim
    s5, t5 = s.float().view(b, nk, ndim, h, w), t.float().view(b, nk, ndim, h, w)
    d2 = 4.0 * ((s5[:, :, 0] - t5[:, :, 0]) ** 2 + (s5[:, :, 1] - t5[:, :, 1]) ** 2)  # (grid units)^2
    with torch.no_grad():
        ltrb = dfl_distances(teacher_box)
        area = ((ltrb[:, 0] + ltrb[:, 2]) * (ltrb[:, 1] + ltrb[:, 3]) * KPT_AREA).clamp_min(1e-6)  # (B, H, W)
        vis = torch.sigmoid(t5[:, :, 2]) if ndim == 3 else torch.ones_like(d2)
    sig = sigmas.to(device=s.device, dtype=torch.float32).view(1, nk, 1, 1)
    e = d2 / ((2 * sig) ** 2 * area[:, None] * 2)
    loss = (vis * (1 - torch.exp(-e))).sum(1) / (vis.sum(1) + 1e-9)  # (B, H, W)
    if ndim == 3 and visibility_weight:
        loss = loss + visibility_weight * sigmoid_soft_label_loss(s5[:, :, 2], t5[:, :, 2], temperature,
                                                                  per_position=True)
    return loss if per_position else loss.mean()


def _oks(s, t, spec, per_position: bool = False, reg_max: int = 16, context=None):
    return oks_keypoint_loss(s, t, context["teacher_box"], context["sigmas"], context.get("ndim", 3),
                             spec.temperature, spec.visibility_weight, per_position)


class OKSLossSpec(LossSpec):
    """`oks` (keypoint branch): 1 - OKS of the student's keypoints against the teacher's, sized by the teacher's box
    and weighted by its keypoint visibility, plus a visibility soft-label term."""

    visibility_weight: float = Field(1.0, ge=0, description="weight of the keypoint-visibility soft-label term")


LOSSES.add("soft_label", _soft_label)
LOSSES.add("bce", lambda s, t, spec, per_position=False, reg_max=16, context=None: sigmoid_soft_label_loss(
    s, t, spec.temperature, per_position))
LOSSES.add("l2", lambda s, t, spec, per_position=False, reg_max=16, context=None: l2_loss(s, t, per_position))
LOSSES.add("oks", _oks, config=OKSLossSpec)

NEEDS_BOX = {"oks"}  # losses that read the teacher's box node at the same level (context["teacher_box"])
