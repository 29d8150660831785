"""Q/DQ placement that TensorRT fuses, applied when the student is built (not patched into the ONNX afterwards).

    report = apply_placement(student, quant_config, family, reference=teacher)

1. The model family inserts quantizers where TensorRT wants them besides the conv inputs (families/: every Concat
   input, both inputs of a residual Add, the Upsample input; see families/ultralytics/blocks.py).
2. A dry-run trace (act.blocks.quant.trace) finds the quantizers that must share one scale:
     fanout    quantizers that see the same tensor (one tensor, one Q: the producer writes INT8 once)
     concat    every input of a Concat and the quantizers that read its output (TensorRT elides the Concat)
     maxpool   a MaxPool's input and output (SPPF; max commutes with quantization)
     upsample  a nearest Upsample's input and output
   and merges each group into ONE ActivationQuantizer module (one moving average, one PACT alpha, trained together;
   the quantizer takes one moving-average step per forward with the max over all its calls).
3. With every quantizer off the placed model must compute exactly what the teacher does; else placement stops with
   an error naming the rule set to turn off.

Nothing is added after the head's last convs: the decode (DFL, anchors, sigmoid) stays in float.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from act.core.errors import ModelError
from act.blocks.quant.quantizers import ActivationQuantizer
from act.blocks.quant.trace import trace_quantizers

RULES = ("concat", "residual_add", "maxpool", "upsample", "fanout")


def resolve_rules(cfg, family) -> Dict[str, bool]:
    """quant.placement -> {rule: on/off}: the preset's rules (auto: the family's default), then explicit overrides."""
    preset = getattr(cfg, "preset", "auto")
    if preset == "auto":
        preset = getattr(family, "default_placement", "tensorrt")
    if preset == "tensorrt":
        rules = dict(getattr(family, "placement_rules", {r: True for r in RULES}))
    else:  # "conv": a quantizer on every conv input and weight, nothing else
        rules = {r: False for r in RULES}
    for r in RULES:
        v = getattr(cfg, r, None)
        if v is not None:
            rules[r] = bool(v)
    return rules


class _UnionFind:
    def __init__(self):
        self.parent: Dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, items: Iterable[int]) -> None:
        items = list(items)
        for b in items[1:]:
            ra, rb = self.find(items[0]), self.find(b)
            if ra != rb:
                self.parent[rb] = ra


def _flat(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


def _all_paths(model: nn.Module) -> Dict[int, List[str]]:
    paths: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, ActivationQuantizer):
            paths.setdefault(id(m), []).append(name)
    return paths


def share_groups(model: nn.Module, groups: List[List[nn.Module]], calls: Dict[int, int]) -> None:
    """Make every member of each group the same module (the first one), wherever it is referenced."""
    paths = _all_paths(model)
    for members in groups:
        keep = members[0]
        keep.calls_per_step = sum(calls.get(id(m), 0) for m in members) or 1
        for m in members[1:]:
            for path in paths.get(id(m), []):
                parent_name, _, attr = path.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, keep)


def compute_groups(model: nn.Module, trace, rules: Dict[str, bool]) -> List[List[nn.Module]]:
    quantizers = {id(m): m for m in model.modules() if isinstance(m, ActivationQuantizer)}
    first_name = {k: v[0] for k, v in _all_paths(model).items()}
    uf = _UnionFind()
    by_key: Dict[tuple, List[int]] = {}
    for qid, keys in trace.seen.items():
        uf.find(qid)
        for k in keys:
            by_key.setdefault(k, []).append(qid)
    if rules.get("fanout"):
        for qids in by_key.values():
            uf.union(qids)
    quantized_pieces = {k for op in trace.ops if op.kind == "split" and by_key.get(op.inputs[0]) for k in op.outputs}
    piece_of = {k: op.inputs[0] for op in trace.ops if op.kind == "split" for k in op.outputs}
    for op in trace.ops:
        if op.kind == "split":  # the pieces of a quantized tensor carry its scale: part of the same fan-out
            if rules.get("fanout"):
                uf.union(by_key.get(op.inputs[0], []) + [q for k in op.outputs for q in by_key.get(k, [])])
            continue
        if not rules.get(op.kind):
            continue
        members = [q for k in op.inputs for q in by_key.get(k, []) + by_key.get(piece_of.get(k), [])]
        members += by_key.get(op.output, [])
        if op.kind == "concat":
            # only a Concat whose inputs are quantized (the head's float concats of the decode are not); a piece of
            # a quantized tensor (C2f's chunks of cv1's output) counts as quantized
            if not all(by_key.get(k) or k in quantized_pieces for k in op.inputs):
                continue
        uf.union(members)
    groups: Dict[int, List[int]] = {}
    for qid in quantizers:
        groups.setdefault(uf.find(qid), []).append(qid)
    out = []
    for qids in groups.values():
        qids.sort(key=lambda q: first_name.get(q, ""))
        out.append([quantizers[q] for q in qids])
    out.sort(key=lambda g: first_name.get(id(g[0]), ""))
    return out


def quantizer_factory(quant_cfg):
    act = quant_cfg.activation
    alpha_init = None if act.alpha_init == "auto" else float(act.alpha_init)

    def make() -> ActivationQuantizer:
        return ActivationQuantizer(ema_rate=act.ema_rate, pact=act.pact, alpha_init=alpha_init)

    return make


def apply_placement(model: nn.Module, quant_cfg, family, reference: Optional[nn.Module] = None,
                    imgsz: int = 64) -> Dict:
    """Insert and share quantizers per `quant_cfg.placement` (see the module doc). `model` is already quantized
    (act.blocks.quant.quantize); `reference` is the float model it came from, to check that placement changed nothing
    but the quantization. Returns a report (rules, groups) that summary.json keeps."""
    from act.blocks.quant import activation_quantizers

    rules = resolve_rules(getattr(quant_cfg, "placement", None), family)
    changed = family.insert_block_quantizers(model, rules, quantizer_factory(quant_cfg)) if any(
        rules[r] for r in ("concat", "residual_add", "upsample")) else []
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(1, 3, imgsz, imgsz, generator=gen).to(device)
    trace = trace_quantizers(model, example)
    never = sorted(n for n, q in activation_quantizers(model).items() if not trace.calls(q))
    if never:
        raise ModelError(f"placement: {len(never)} quantizers are never called in a forward pass (e.g. {never[0]})")
    groups = compute_groups(model, trace, rules)
    calls = {k: len(v) for k, v in trace.seen.items()}
    share_groups(model, groups, calls)
    if reference is not None:
        ref_dev = next(reference.parameters()).device
        with torch.no_grad():
            was = reference.training
            reference.eval()
            ref = _flat(reference(example.to(ref_dev)))
            reference.train(was)
        got = _flat(trace.output)
        same = len(ref) == len(got) and all(
            a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), rtol=1e-4, atol=1e-4)
            for a, b in zip(ref, got))
        if not same:
            raise ModelError("placement changed what the model computes (with quantizers off it no longer matches "
                             "the teacher): this Ultralytics version's blocks differ from the ones act knows. Set "
                             "quant.placement.preset: conv to quantize conv inputs only.")
    names = {id(q): n for n, q in activation_quantizers(model).items()}
    shared = [g for g in groups if len(g) > 1]
    return {
        "rules": rules,
        "blocks": len(changed),
        "quantizers_before": sum(len(g) for g in groups),
        "quantizers": len(groups),
        "shared_groups": len(shared),
        "largest_group": max((len(g) for g in groups), default=0),
        "groups": [{"name": names.get(id(g[0]), "?"), "members": len(g), "calls": g[0].calls_per_step}
                   for g in shared],
    }
