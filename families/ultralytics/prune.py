"""What torch-pruning needs to know about Ultralytics YOLO models (used by act.blocks.prune through the family object):
the C2f/C3k2 chunk split made prunable, the modules whose channels stay, the forward that traces the graph."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

# Modules whose channels torch-pruning must not touch: attention blocks (their qkv split / view(num_heads, ...) ties
# channels to heads, and the C2PSA around them splits its cv1 output in two) and the DFL decode (fixed 16 bins).
UNPRUNABLE_TYPES = ("C2PSA", "PSA", "PSABlock", "Attention", "AAttn", "ABlock", "A2C2f", "DFL")


def _c2f_base():
    from ultralytics.nn.modules.block import C2f

    return C2f


class SplitC2f(nn.Module):
    """A C2f / C3k2 whose cv1 (one conv whose output `chunk(2, 1)` splits in halves) is two convs, cv0 and cv1: the
    same function, but torch-pruning can prune the two halves independently (after pruning they differ in width,
    which `chunk` could not express). This is torch-pruning's `C2f_v2` recipe for Ultralytics models.

    Kept as its own class (not a C2f subclass, whose forward would chunk): checkpoints of pruned students pickle it,
    so loading them needs `families` importable (it ships with act)."""

    def __init__(self, src: nn.Module):
        super().__init__()
        import copy

        self.c = src.c
        cv1 = src.cv1
        c = cv1.conv.out_channels // 2
        self.cv0, self.cv1 = copy.deepcopy(cv1), copy.deepcopy(cv1)
        for conv, sl in ((self.cv0.conv, slice(0, c)), (self.cv1.conv, slice(c, 2 * c))):
            conv.weight = nn.Parameter(cv1.conv.weight.data[sl].clone(), requires_grad=cv1.conv.weight.requires_grad)
            conv.out_channels = c
            if conv.bias is not None:
                conv.bias = nn.Parameter(cv1.conv.bias.data[sl].clone(), requires_grad=cv1.conv.bias.requires_grad)
            bn = getattr(self.cv0 if conv is self.cv0.conv else self.cv1, "bn", None)
            if isinstance(bn, nn.BatchNorm2d):
                for name in ("weight", "bias"):
                    setattr(bn, name, nn.Parameter(getattr(bn, name).data[sl].clone()))
                for name in ("running_mean", "running_var"):
                    setattr(bn, name, getattr(bn, name)[sl].clone())
                bn.num_features = c
        self.cv2 = src.cv2
        self.m = src.m
        # Ultralytics' parse bookkeeping, used by its forward loop and summaries
        for attr in ("i", "f", "type", "np"):
            if hasattr(src, attr):
                setattr(self, attr, getattr(src, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f_blocks(model: nn.Module) -> int:
    """Replace every C2f / C3k2 (chunk split) with a SplitC2f, in place. Returns how many were replaced."""
    base = _c2f_base()
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, base) and not isinstance(m, SplitC2f):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = SplitC2f(m)
            if isinstance(parent, (nn.Sequential, nn.ModuleList)):
                parent[int(child)] = new
            else:
                setattr(parent, child, new)
            n += 1
    return n


def prune_ignored(family, model: nn.Module, keep_branches: Sequence[str] = ()) -> List[nn.Module]:
    """Modules whose output channels stay: the last conv of every head branch (the distillation nodes, whose widths
    are the box bins / classes / keypoints), the DFL decode, attention blocks (see UNPRUNABLE_TYPES), and every conv
    of the head branches named in keep_branches (box / cls / kpt; e.g. the keypoint branch, whose hidden convs have
    as many channels as its 51 outputs)."""
    from families.ultralytics.layout import BRANCHES

    names = {n for n, _, _ in family.head_branches(model)}
    out = [m for n, m in model.named_modules() if n in names or type(m).__name__ in UNPRUNABLE_TYPES]
    head = family.head(model)
    for attr, kind in BRANCHES.items():
        branch = getattr(head, attr, None)
        if kind in keep_branches and branch is not None:
            out += [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
    return out


def prune_forward(model: nn.Module, x: torch.Tensor):
    """Forward used to trace the graph: training mode, where the head returns its raw branch outputs (no decode, whose
    box/class split torch-pruning would otherwise have to follow). BatchNorm running statistics stay as they were
    (momentum 0 for the trace: the traced input is an all-zero image)."""
    was = model.training
    bns = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    try:
        for m, _ in bns:
            m.momentum = 0.0
        out = model(x)
    finally:
        for m, momentum in bns:
            m.momentum = momentum
        model.train(was)
    return out

