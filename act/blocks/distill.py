"""Label-free distillation: capture the teacher's and student's outputs at chosen nodes and compare them.

Nodes default to the last conv of each head branch (found by the model family); each node gets the loss of its
branch type (box: soft-label over the DFL bins, cls: sigmoid soft-label, kpt: L2), weighted per node. Feature nodes
(`distill.features`, e.g. the neck outputs the head reads) add an L2 loss on intermediate feature maps, relative to
the teacher's mean square there; a pruned student's feature channels are compared with the teacher channels they
were kept from (the channel map a prune stage records, see `channel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from act.core.errors import ActError, ConfigError
from act.blocks.losses import LOSSES, NEEDS_BOX, feature_l2, teacher_score_weights, weighted_mean


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


class DistillLoss(nn.Module):
    """Sum over nodes of weight(branch) * weight(node) * loss(branch)(student, teacher), plus with
    `distill.pseudo_labels` its weight x the family's training loss against the teacher's detections."""

    def __init__(self, nodes: List[Node], config, reg_max: int = 16, oks_sigmas=None, kpt_ndim: int = 3,
                 pseudo_labels: Optional[Callable] = None):
        """oks_sigmas, kpt_ndim: the family's per-keypoint OKS sigmas and keypoint layout (pose models), for
        `type: oks`. pseudo_labels: the family's `(student_out, teacher_out) -> loss` of `distill.pseudo_labels`."""
        super().__init__()
        self.nodes = nodes
        self.pseudo_labels = pseudo_labels
        # what in the loss waits for the host, so the step cannot be a CUDA graph (act.run.step_graph)
        self.host_sync = "distill.pseudo_labels: the teacher's NMS has data-dependent shapes" if pseudo_labels else None
        self.cfg = config
        self.reg_max = reg_max
        self.oks_sigmas = None if oks_sigmas is None else torch.as_tensor(oks_sigmas, dtype=torch.float32)
        self.kpt_ndim = kpt_ndim
        # losses in keypoint space (oks) read the teacher's box node at the same pyramid level
        self.box_node = {n.level: n.name for n in nodes if n.branch == "box" and n.level >= 0}
        # weighting teacher_score: the class node of each pyramid level supplies the weights of its box/kpt nodes
        self.score_node = {n.level: n.name for n in nodes if n.branch == "cls" and n.level >= 0}
        self.channel_maps: Dict[str, torch.Tensor] = {}  # feature node -> teacher channel of each student channel
        for n in nodes:
            kind = self.cfg.losses[n.branch].type
            if kind in NEEDS_BOX and n.branch != "kpt":
                raise ConfigError(f"invalid config:\n  distill.losses.{n.branch}.type: {kind} compares keypoints; it "
                                  f"is for the kpt branch (got it on {n.name})")
            if kind in NEEDS_BOX and (n.level not in self.box_node or self.oks_sigmas is None):
                raise ConfigError(f"invalid config:\n  distill.losses.{n.branch}.type: {kind} needs the teacher's box "
                                  f"node at the level of {n.name} and the model's keypoint sigmas (a pose model with "
                                  f"distill.nodes: auto)")
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
                  weights: Optional[torch.Tensor] = None, teacher_out: Optional[Dict[str, torch.Tensor]] = None
                  ) -> torch.Tensor:
        spec = self.cfg.losses[node.branch]
        per_position = weights is not None
        if node.branch == "feature":
            loss = feature_l2(s, self._teacher_channels(node, s, t), per_position)
        else:
            context = None
            if spec.type in NEEDS_BOX:
                if self.oks_sigmas.device != s.device:  # once: a copy from the host each step would break
                    self.oks_sigmas = self.oks_sigmas.to(s.device)  # the CUDA graph capture of the step
                context = {"teacher_box": teacher_out[self.box_node[node.level]], "sigmas": self.oks_sigmas,
                           "ndim": self.kpt_ndim}
            loss = LOSSES[spec.type](s, t, spec, per_position=per_position, reg_max=self.reg_max, context=context)
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
            loss = self.node_loss(node, student_out[node.name], teacher_out[node.name], weights, teacher_out)
            w = self.cfg.losses[node.branch].weight * self.cfg.node_weights.get(node.name, 1.0)
            per_node[node.name] = loss.detach()
            total = loss * w if total is None else total + loss * w
        if self.pseudo_labels is not None:
            loss = self.pseudo_labels(student_out, teacher_out)
            per_node["pseudo_labels"] = loss.detach()
            total = total + loss * self.cfg.pseudo_labels.weight
        return total, per_node
