"""A dry-run trace of where the activation quantizers sit in the dataflow, without torch.fx (which does not trace
Ultralytics models): one forward with every quantizer off, recording

  * the tensor each quantizer call sees (forward pre-hooks),
  * the inputs and output of every torch.cat and the pieces of every chunk/split (a TorchFunctionMode), and the
    input and output of every MaxPool2d / Upsample (module hooks).

Tensors are identified by their storage, offset, shape and strides (a chunk of a tensor is its own view), and kept
alive during the trace so that no address is reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from act.blocks.quant.quantizers import ActivationQuantizer

Key = Tuple[int, int, Tuple[int, ...], Tuple[int, ...]]


def tensor_key(t: torch.Tensor) -> Key:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


@dataclass
class Op:
    kind: str  # "concat", "maxpool", "upsample", "split"
    inputs: List[Key]
    output: Key
    outputs: List[Key] = field(default_factory=list)  # "split": every piece


@dataclass
class Trace:
    seen: Dict[int, List[Key]] = field(default_factory=dict)  # id(quantizer) -> keys of the tensors it was called on
    ops: List[Op] = field(default_factory=list)
    output: object = None

    def calls(self, q: nn.Module) -> int:
        return len(self.seen.get(id(q), []))


class _CatRecorder(TorchFunctionMode):
    def __init__(self, trace: Trace, keep: list):
        super().__init__()
        self.trace, self.keep = trace, keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)):
            tensors = args[0] if args else (kwargs or {}).get("tensors", [])
            if isinstance(out, torch.Tensor) and all(isinstance(t, torch.Tensor) for t in tensors):
                self.keep.extend(tensors)
                self.keep.append(out)
                self.trace.ops.append(Op("concat", [tensor_key(t) for t in tensors], tensor_key(out)))
        elif func in _SPLITS and args and isinstance(args[0], torch.Tensor) and isinstance(out, (list, tuple)):
            pieces = [t for t in out if isinstance(t, torch.Tensor)]
            self.keep.append(args[0])
            self.keep.extend(pieces)
            self.trace.ops.append(Op("split", [tensor_key(args[0])], tensor_key(args[0]),
                                     [tensor_key(t) for t in pieces]))
        return out


_SPLITS = (torch.Tensor.chunk, torch.Tensor.split, torch.chunk, torch.split)


@torch.no_grad()
def trace_quantizers(model: nn.Module, example: torch.Tensor) -> Trace:
    """Run `model(example)` once, quantizers off, and record the dataflow around them. The model's quantizer modes
    and train/eval state are restored afterwards."""
    trace = Trace()
    keep: list = []
    quantizers = {id(m): m for m in model.modules() if isinstance(m, ActivationQuantizer)}
    modes = {k: q.mode for k, q in quantizers.items()}
    weight_q = [(m, m.enabled) for m in model.modules() if hasattr(m, "per_channel") and hasattr(m, "enabled")]
    handles = []

    def q_hook(module, args):
        x = args[0]
        keep.append(x)
        trace.seen.setdefault(id(module), []).append(tensor_key(x))

    def op_hook(kind):
        def hook(module, args, out):
            keep.extend([args[0], out])
            trace.ops.append(Op(kind, [tensor_key(args[0])], tensor_key(out)))

        return hook

    for q in quantizers.values():
        handles.append(q.register_forward_pre_hook(q_hook))
    for m in model.modules():
        if isinstance(m, nn.MaxPool2d):
            handles.append(m.register_forward_hook(op_hook("maxpool")))
        elif isinstance(m, nn.Upsample) and getattr(m, "mode", "nearest") == "nearest":
            handles.append(m.register_forward_hook(op_hook("upsample")))
    was_training = model.training
    for q in quantizers.values():
        q.mode = "off"
    for m, _ in weight_q:
        m.enabled = False
    model.eval()
    try:
        with _CatRecorder(trace, keep):
            trace.output = model(example)
    finally:
        for h in handles:
            h.remove()
        for k, q in quantizers.items():
            q.mode = modes[k]
        for m, enabled in weight_q:
            m.enabled = enabled
        model.train(was_training)
    return trace
