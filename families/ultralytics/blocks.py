"""Q/DQ placement inside Ultralytics blocks: where TensorRT wants quantizers besides every conv input.

TensorRT's explicit quantization fuses what the Q/DQ placement lets it fuse (TensorRT developer guide, "Explicit
Quantization" > "Q/DQ Layer-Placement Recommendations",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html):
  * Concat: when every input is quantized with one scale, the Concat runs in INT8 and is elided (each producer writes
    into its slice); inputs with different scales, or a float input, cost a requantize/reformat layer.
  * Residual Add: quantizing both inputs lets the Add run in INT8 (and fuse into the producing conv) instead of
    dequantizing the whole tensor to float.
  * MaxPool / nearest Upsample commute with quantization: with the same scale on input and output they run in INT8.
This module swaps the class of the Ultralytics blocks that hold those ops for a subclass whose forward is the
original one with quantizers at those places (state dict, attributes and isinstance stay the same). One quantizer
per Concat (all its inputs; for C2f/C2PSA the conv output before its chunk/split, as NVIDIA's YOLO QAT examples
do), two per residual Add, one per Upsample input; `act.blocks.quant.placement` then merges the
quantizers that must share a scale (the same tensor, a Concat's inputs and the convs reading its output, ...) into
one module.

Only blocks whose forward is exactly Ultralytics' (checked by identity of the function) are swapped; the placement
then checks that the swapped model computes the same as the original with all quantizers off.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

QuantFactory = Callable[[], nn.Module]


# ---- quantized forwards (Ultralytics' own, with quantizers inserted) ------------------------------------------------
class _QuantBlock:
    """Marker base of the swapped classes."""

    act_original_class = None


def _c2f_forward(self, x):
    q = self.cat_quantizer  # on cv1's output before the chunk (its conv writes INT8 once), and on each block output
    y = list(q(self.cv1(x)).chunk(2, 1))
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y[:2] + [q(t) for t in y[2:]], 1))


def _split_c2f_forward(self, x):
    q = self.cat_quantizer  # families.ultralytics.prune.SplitC2f (a pruned C2f / C3k2): cv0, cv1 and block outputs
    y = [q(self.cv0(x)), q(self.cv1(x))]
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y[:2] + [q(t) for t in y[2:]], 1))


def _c3_forward(self, x):
    q = self.cat_quantizer
    return self.cv3(torch.cat((q(self.m(self.cv1(x))), q(self.cv2(x))), 1))


def _sppf_forward(self, x):
    q = self.cat_quantizer  # MaxPool input and output and every Concat input: one scale
    y = [q(self.cv1(x))]
    y.extend(q(self.m(y[-1])) for _ in range(getattr(self, "n", 3)))
    y = self.cv2(torch.cat(y, 1))
    if getattr(self, "add", False):
        aq = getattr(self, "add_quantizers", None)
        return aq[0](y) + aq[1](x) if aq is not None else y + x
    return y


def _bottleneck_forward(self, x):
    if self.add:
        return self.add_quantizers[0](x) + self.add_quantizers[1](self.cv2(self.cv1(x)))
    return self.cv2(self.cv1(x))


def _c2psa_forward(self, x):
    q = self.cat_quantizer
    a, b = q(self.cv1(x)).split((self.c, self.c), dim=1)
    b = self.m(b)
    return self.cv2(torch.cat((a, q(b)), 1))


def _psablock_forward(self, x):
    if self.add:
        qa, qb, qc, qd = self.add_quantizers
        x = qa(x) + qb(self.attn(x))
        return qc(x) + qd(self.ffn(x))
    return self.ffn(self.attn(x))


def _concat_forward(self, x):
    q = self.cat_quantizer
    return torch.cat([q(t) for t in x], self.d)


def _upsample_forward(self, x):
    return F.interpolate(self.input_quantizer(x), self.size, self.scale_factor, self.mode, self.align_corners,
                         recompute_scale_factor=self.recompute_scale_factor)


def _specs():
    """(Ultralytics class, its forward act knows, quantized forward, quantizers to add {attr: count}, rule)."""
    from ultralytics.nn.modules import block, conv

    from families.ultralytics.prune import SplitC2f

    specs = [
        (block.C2f, block.C2f.forward, _c2f_forward, {"cat_quantizer": 1}, "concat"),
        (SplitC2f, SplitC2f.forward, _split_c2f_forward, {"cat_quantizer": 1}, "concat"),
        (block.C3, block.C3.forward, _c3_forward, {"cat_quantizer": 1}, "concat"),
        (block.SPPF, block.SPPF.forward, _sppf_forward, {"cat_quantizer": 1, "add_quantizers": 2}, "concat"),
        (block.Bottleneck, block.Bottleneck.forward, _bottleneck_forward, {"add_quantizers": 2}, "residual_add"),
        (conv.Concat, conv.Concat.forward, _concat_forward, {"cat_quantizer": 1}, "concat"),
        (nn.Upsample, nn.Upsample.forward, _upsample_forward, {"input_quantizer": 1}, "upsample"),
    ]
    if hasattr(block, "C2PSA"):
        specs.append((block.C2PSA, block.C2PSA.forward, _c2psa_forward, {"cat_quantizer": 1}, "concat"))
    if hasattr(block, "PSABlock"):
        specs.append((block.PSABlock, block.PSABlock.forward, _psablock_forward, {"add_quantizers": 4},
                      "residual_add"))
    return specs


_SWAPPED: Dict[type, type] = {}


def _quant_class(cls: type, forward) -> type:
    """A subclass of `cls` with the quantized forward, made once per class and registered in this module so that
    pickled students (best.pt) load again."""
    if cls not in _SWAPPED:
        name = f"Quant{cls.__name__}"
        new = type(name, (cls, _QuantBlock), {"forward": forward, "__module__": __name__, "act_original_class": cls})
        globals()[name] = new
        _SWAPPED[cls] = new
    return _SWAPPED[cls]


def register_quant_classes() -> None:
    """Create (and register for unpickling) every Quant* class."""
    for cls, _known, fwd, _attrs, _rule in _specs():
        _quant_class(cls, fwd)


def __getattr__(name: str):
    # unpickling a student looks up e.g. families.ultralytics.blocks.QuantC3k2 before any placement ran
    if name.startswith("Quant"):
        register_quant_classes()
        for cls in list(_SWAPPED.values()):
            if cls.__name__ == name:
                return cls
        # subclasses of the known blocks (C3k2 is a C2f, C3k a C3) get their own Quant class on demand
        from ultralytics.nn.modules import block, conv

        base = getattr(block, name[5:], None) or getattr(conv, name[5:], None)
        if isinstance(base, type):
            for cls, _known, fwd, _attrs, _rule in _specs():
                if issubclass(base, cls):
                    return _quant_class(base, fwd)
    raise AttributeError(name)


def insert_block_quantizers(model: nn.Module, rules: Dict[str, bool], factory: QuantFactory) -> List[str]:
    """Give every supported block its quantizers (per `rules`: concat, residual_add, upsample) and its quantized
    forward. Returns the names of the blocks changed. Blocks whose forward differs from the one act knows (a
    subclass that overrides it, another Ultralytics version) are left alone."""
    changed = []
    specs = _specs()
    for name, m in list(model.named_modules()):
        if isinstance(m, _QuantBlock):
            continue
        for cls, known, fwd, attrs, rule in specs:
            if not isinstance(m, cls) or type(m).forward is not known:
                continue
            if not rules.get(rule, False):
                break
            if rule == "concat" and "add_quantizers" in attrs and not getattr(m, "add", False):
                attrs = {k: v for k, v in attrs.items() if k != "add_quantizers"}
            if rule == "residual_add" and not getattr(m, "add", False):
                break  # no shortcut: nothing to quantize
            if "add_quantizers" in attrs and not rules.get("residual_add", False):
                attrs = {k: v for k, v in attrs.items() if k != "add_quantizers"}
                if not attrs:
                    break
            for attr, n in attrs.items():
                qs = [factory() for _ in range(n)]
                setattr(m, attr, qs[0] if n == 1 else nn.ModuleList(qs))
            m.__class__ = _quant_class(type(m), fwd)
            changed.append(name)
            break
    return changed
