"""Label-free distillation: capture the teacher's and student's outputs at chosen nodes and compare them.

Nodes default to the last conv of each head branch (found by the model family); each node gets the loss of its
branch type (box: soft-label over the DFL bins, cls: sigmoid soft-label, kpt: L2), weighted per node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from act.errors import ConfigError


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


def soft_label_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, axis: str, reg_max: int = 16):
    """KL(teacher || student) of softmax(x / T) over `axis`, times T^2 (cross-entropy minus the teacher's entropy:
    same gradient, and 0 when they agree)."""
    s, t = s.float(), t.float()
    if axis == "dfl":
        s, t, dim = _split_dfl(s, reg_max), _split_dfl(t, reg_max), 2
    elif axis == "channel":
        dim = 1
    else:  # spatial
        s, t, dim = s.flatten(2), t.flatten(2), 2
    log_ps = F.log_softmax(s / temperature, dim=dim)
    log_pt = F.log_softmax(t / temperature, dim=dim)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=dim)
    return kl.mean() * temperature**2


def sigmoid_soft_label_loss(s: torch.Tensor, t: torch.Tensor, temperature: float):
    """Binary KL between sigmoid(t / T) and sigmoid(s / T), per element, times T^2."""
    s, t = s.float() / temperature, t.float() / temperature
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature**2


def l2_loss(s: torch.Tensor, t: torch.Tensor):
    return F.mse_loss(s.float(), t.float())


class DistillLoss(nn.Module):
    """Sum over nodes of weight(branch) * weight(node) * loss(branch)(student, teacher)."""

    def __init__(self, nodes: List[Node], config, reg_max: int = 16):
        super().__init__()
        self.nodes = nodes
        self.cfg = config
        self.reg_max = reg_max

    def node_loss(self, node: Node, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        spec = self.cfg.losses[node.branch]
        if spec.type == "soft_label":
            axis = spec.axis
            if axis == "dfl" and s.shape[1] % 4:
                axis = "channel"
            return soft_label_loss(s, t, spec.temperature, axis, self.reg_max)
        if spec.type == "bce":
            return sigmoid_soft_label_loss(s, t, spec.temperature)
        return l2_loss(s, t)

    def forward(self, student_out: Dict[str, torch.Tensor], teacher_out: Dict[str, torch.Tensor]):
        per_node: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        for node in self.nodes:
            loss = self.node_loss(node, student_out[node.name], teacher_out[node.name])
            w = self.cfg.losses[node.branch].weight * self.cfg.node_weights.get(node.name, 1.0)
            per_node[node.name] = loss.detach()
            total = loss * w if total is None else total + loss * w
        return total, per_node
