"""Fine-grained weight sparsity kept by masks: semi-structured 2:4 (TensorRT sparse tensor cores) and unstructured
magnitude sparsity. The weights stay dense tensors with zeros in place (as exported to ONNX).

2:4 layout: a conv weight (K, C, R, S) is grouped in fours along the input channels C, separately for each output
channel k and kernel position (r, s); in every group the two weights of largest magnitude stay. This is the pattern
TensorRT requires ("for each output channel and for each spatial pixel in the kernel weights, every four input
channels must have at least two zeros") and the one NVIDIA's ASP (apex.contrib.sparsity, m4n2_1d on the weight
permuted to K, R, S, C) produces. Layers whose input channels per group are not a multiple of 4 (the RGB stem,
depthwise convs) stay dense: TensorRT runs them dense anyway.

    masks = SparsityMasks.compute(model, "2:4")   # from the weight magnitudes
    masks.apply(model)                            # after every optimizer step
    masks = SparsityMasks.from_zeros(model, "2:4")  # later stages / resume: the same masks, read off the zeros
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from act.blocks.quant import matches_any


def _in_per_group(m: nn.Module) -> int:
    return m.weight.shape[1]


def eligible_layers(model: nn.Module, pattern: str, ignore: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """Conv2d / Linear layers the pattern applies to (by module name)."""
    pats = list(ignore)
    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or (pats and matches_any(n, pats)):
            continue
        if pattern == "2:4" and _in_per_group(m) % 4:
            continue
        out[n] = m
    return out


def _to_groups(w: torch.Tensor) -> torch.Tensor:
    """(K, C, *k) -> (K * prod(k) * C/4, 4): groups of four consecutive input channels per output channel/position."""
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(-1, 4)


def _from_groups(g: torch.Tensor, shape) -> torch.Tensor:
    if len(shape) == 4:
        k, c, r, s = shape
        return g.reshape(k, r, s, c).permute(0, 3, 1, 2).contiguous()
    return g.reshape(shape)


def mask_2to4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 input channels (see the module doc)."""
    g = _to_groups(w.detach().abs().float())
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(1, g.topk(2, dim=1).indices, True)
    return _from_groups(keep, w.shape)


def is_2to4(w: torch.Tensor) -> bool:
    """Every group of four input channels has at least two zeros."""
    return bool(((_to_groups(w.detach()) == 0).sum(1) >= 2).all())


class SparsityMasks:
    def __init__(self, masks: Dict[str, torch.Tensor], pattern: str):
        self.masks = masks
        self.pattern = pattern

    @classmethod
    def compute(cls, model: nn.Module, pattern: str, ratio: float = 0.5, scope: str = "layer",
                ignore: Iterable[str] = ()) -> "SparsityMasks":
        layers = eligible_layers(model, pattern, ignore)
        if pattern == "2:4":
            return cls({n: mask_2to4(m.weight) for n, m in layers.items()}, pattern)
        if scope == "global":
            mags = torch.cat([m.weight.detach().abs().flatten().float().cpu() for m in layers.values()])
            k = max(1, int(ratio * mags.numel()))
            thr = float(mags.kthvalue(k).values)
            return cls({n: m.weight.detach().abs() > thr for n, m in layers.items()}, pattern)
        masks = {}
        for n, m in layers.items():
            a = m.weight.detach().abs().flatten().float()
            k = int(ratio * a.numel())
            masks[n] = (m.weight.detach().abs() > a.kthvalue(k).values) if k >= 1 else torch.ones_like(
                m.weight, dtype=torch.bool)
        return cls(masks, pattern)

    @classmethod
    def from_zeros(cls, model: nn.Module, pattern: str, ignore: Iterable[str] = ()) -> "SparsityMasks":
        """The masks of an already sparse model: 2:4 recomputed (the two zeros of each group are its smallest), or
        for unstructured, its non-zero weights."""
        layers = eligible_layers(model, pattern, ignore)
        if pattern == "2:4":
            return cls({n: mask_2to4(m.weight) for n, m in layers.items() if is_2to4(m.weight)}, pattern)
        return cls({n: m.weight.detach() != 0 for n, m in layers.items() if bool((m.weight == 0).any())}, pattern)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        for n, mask in self.masks.items():
            w = model.get_submodule(n).weight
            if mask.device != w.device:
                mask = self.masks[n] = mask.to(w.device)
            w.mul_(mask)

    def stats(self, model: Optional[nn.Module] = None) -> Dict[str, float]:
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        out = {"pattern": self.pattern, "layers": len(self.masks), "weights": total,
               "sparsity": round(zeros / total, 4) if total else 0.0}
        if model is not None:
            all_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
            out["sparsity_of_all_weights"] = round(zeros / all_w, 4) if all_w else 0.0
        return out
