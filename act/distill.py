"""Label-free distillation: capture the teacher's and student's outputs at chosen nodes and compare them.

Nodes default to the last conv of each head branch (found by the model family); each node gets the loss of its
branch type (box: soft-label over the DFL bins, cls: sigmoid soft-label, kpt: L2), weighted per node. Feature nodes
(`distill.features`, e.g. the neck outputs the head reads) add an L2 loss on intermediate feature maps, relative to
the teacher's mean square there; a pruned student's feature channels are compared with the teacher channels they
were kept from (the channel map a prune stage records, see `channel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from act.errors import ActError, ConfigError


@dataclass(frozen=True)
class Node:
    name: str
    branch: str  # box | cls | kpt | other
    level: int = -1

    @property
    def tag(self) -> str:
        return f"{self.branch}{self.level}" if self.level >= 0 else self.name


def find_nodes(model: nn.Module, family, spec="auto") -> List[Node]:
    """'auto' -> the last conv of every head branch; a list of names -> those modules (branch inferred if known)."""
    known = {n: Node(n, b, lvl) for n, b, lvl in family.head_branches(model)}
    if spec == "auto":
        return list(known.values())
    names = dict(model.named_modules())
    missing = [n for n in spec if n not in names]
    if missing:
        raise ConfigError(f"invalid config:\n  distill.nodes: no module named {missing} in the model")
    return [known.get(n, Node(n, "other")) for n in spec]


def find_feature_nodes(model: nn.Module, family, spec) -> List[Node]:
    """`distill.features`: [] -> none; 'auto' -> the family's feature nodes (for Ultralytics the neck outputs the head
    reads, one per pyramid level); a list of names -> those modules."""
    if not spec:
        return []
    if spec == "auto":
        return [Node(n, "feature", lvl) for n, lvl in family.feature_nodes(model)]
    names = dict(model.named_modules())
    missing = [n for n in spec if n not in names]
    if missing:
        raise ConfigError(f"invalid config:\n  distill.features: no module named {missing} in the model")
    return [Node(n, "feature") for n in spec]


CHANNEL_MAP_ATTR = "act_channel_map"


def channel_map(model: nn.Module) -> Dict[str, List[int]]:
    """{feature module name: the teacher's index of each of its output channels}, recorded on a pruned student by the
    prune stage (a module attribute, so checkpoints carry it); empty for a student of the teacher's width."""
    return getattr(model, CHANNEL_MAP_ATTR, None) or {}


def update_channel_map(model: nn.Module, removed: Dict[str, List[int]], widths: Dict[str, int]) -> None:
    """After a pruning step: drop the removed output channels (indices into the width before the step) from the map
    of each feature module. `widths`: the modules' widths before the step (the teacher's on the first step)."""
    maps = dict(channel_map(model))
    for name, width in widths.items():
        kept = maps.get(name, list(range(width)))
        gone = set(removed.get(name, ()))
        maps[name] = [k for i, k in enumerate(kept) if i not in gone]
    setattr(model, CHANNEL_MAP_ATTR, maps)


class FeatureCapture:
    """Forward hooks that keep the latest output of each node module."""

    def __init__(self, model: nn.Module, names: List[str]):
        self.outputs: Dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for n in names:
            self._handles.append(modules[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def hook(_module, _inp, out):
            self.outputs[name] = out

        return hook

    def pop(self) -> Dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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


class DistillLoss(nn.Module):
    """Sum over nodes of weight(branch) * weight(node) * loss(branch)(student, teacher)."""

    def __init__(self, nodes: List[Node], config, reg_max: int = 16):
        super().__init__()
        self.nodes = nodes
        self.cfg = config
        self.reg_max = reg_max
        # weighting teacher_score: the class node of each pyramid level supplies the weights of its box/kpt nodes
        self.score_node = {n.level: n.name for n in nodes if n.branch == "cls" and n.level >= 0}
        self.channel_maps: Dict[str, torch.Tensor] = {}  # feature node -> teacher channel of each student channel
        for n in nodes:
            if self.cfg.losses[n.branch].weighting == "teacher_score" and n.level not in self.score_node:
                raise ConfigError(f"invalid config:\n  distill.losses.{n.branch}.weighting: teacher_score needs a class "
                                  f"branch node at the same level as {n.name} (distill.nodes: auto finds them)")

    def set_channel_maps(self, maps: Dict[str, List[int]]) -> None:
        """The student's channel map (see `channel_map`): feature nodes compare with these teacher channels."""
        self.channel_maps = {k: torch.as_tensor(v, dtype=torch.long) for k, v in maps.items()}

    def _teacher_channels(self, node: Node, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = self.channel_maps.get(node.name)
        if idx is not None:
            if idx.device != t.device:
                idx = self.channel_maps[node.name] = idx.to(t.device)
            t = t.index_select(1, idx)
        if s.shape[1] != t.shape[1]:
            raise ActError(f"distill.features: {node.name} has {s.shape[1]} channels in the student and "
                           f"{t.shape[1]} in the teacher, and no channel map says which teacher channels it kept")
        return t

    def node_loss(self, node: Node, s: torch.Tensor, t: torch.Tensor,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        spec = self.cfg.losses[node.branch]
        per_position = weights is not None
        if node.branch == "feature":
            loss = feature_l2(s, self._teacher_channels(node, s, t), per_position)
        elif spec.type == "soft_label":
            axis = spec.axis
            if axis == "dfl" and s.shape[1] % 4:
                axis = "channel"
            loss = soft_label_loss(s, t, spec.temperature, axis, self.reg_max, per_position)
        elif spec.type == "bce":
            loss = sigmoid_soft_label_loss(s, t, spec.temperature, per_position)
        else:
            loss = l2_loss(s, t, per_position)
        return weighted_mean(loss, weights) if per_position else loss

    def forward(self, student_out: Dict[str, torch.Tensor], teacher_out: Dict[str, torch.Tensor]):
        per_node: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        scores: Dict[int, torch.Tensor] = {}
        for node in self.nodes:
            weights = None
            if self.cfg.losses[node.branch].weighting == "teacher_score":
                if node.level not in scores:
                    scores[node.level] = teacher_score_weights(teacher_out[self.score_node[node.level]])
                weights = scores[node.level]
            loss = self.node_loss(node, student_out[node.name], teacher_out[node.name], weights)
            w = self.cfg.losses[node.branch].weight * self.cfg.node_weights.get(node.name, 1.0)
            per_node[node.name] = loss.detach()
            total = loss * w if total is None else total + loss * w
        return total, per_node
