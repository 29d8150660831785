"""ONNX hygiene for the Q/DQ export: simplification with onnxslim that keeps every quantized layer quantized.

onnxslim folds constants (shape arithmetic, the decode's anchor tensors), removes dead nodes and merges duplicate
nodes. Two Q/DQ pairs with one scale on one tensor (the same tensor read by several quantized convs, see
act.blocks.quant.placement) become one pair, which is what TensorRT wants anyway. It never folds a weight's Q/DQ into float
weights (checked here: the number of convs with quantized input and weight must not change, or the unsimplified
graph is kept).
"""

from __future__ import annotations

import warnings

import onnx


def int8_convs(proto: onnx.ModelProto) -> int:
    producers = {o: n for n in proto.graph.node for o in n.output}
    count = 0
    for n in proto.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        srcs = [producers.get(i) for i in n.input[:2]]
        count += all(s is not None and s.op_type == "DequantizeLinear" for s in srcs)
    return count


def simplify_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim-simplified copy of `proto`, or `proto` itself (with a warning) when simplification would lose a
    quantized conv or fails."""
    try:
        import onnxslim
    except ImportError:  # a dependency of act; only a broken install lacks it
        warnings.warn("onnxslim is not installed: the ONNX is exported without simplification")
        return proto
    before = int8_convs(proto)
    try:
        slim = onnxslim.slim(proto)
    except Exception as e:  # onnxslim is best effort; an unsimplified graph is still correct
        warnings.warn(f"onnxslim failed ({type(e).__name__}: {e}); the ONNX is exported without simplification")
        return proto
    if slim is None or int8_convs(slim) != before:
        warnings.warn("onnxslim changed the Q/DQ placement; the ONNX is exported without simplification")
        return proto
    del slim.metadata_props[:]  # export_onnx writes the metadata afterwards
    return slim


def metadata_of(proto: onnx.ModelProto) -> dict:
    """The ONNX's metadata (Ultralytics' keys: task, names, imgsz, kpt_shape, stride, ...), stored as strings, with
    their Python values back where a string holds one, as Ultralytics reads them."""
    import ast

    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = ast.literal_eval(p.value)
        except (ValueError, SyntaxError):
            out[p.key] = p.value
    return out


UINT8_ZERO_POINT = "act_activation_zero_point_u8"


def activation_qdq(proto: onnx.ModelProto):
    """The activation Q/DQ nodes: QuantizeLinear of a computed tensor (not a constant weight) and the
    DequantizeLinear reading it. Weight Q/DQ (of an initializer or Constant) are not among them."""
    g = proto.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    quants = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]
    q_out = {n.output[0] for n in quants}
    deqs = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in q_out]
    return quants, deqs


def activations_as_uint8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Store every activation Q/DQ pair as uint8 with zero point 128 instead of int8 with zero point 0, in place.

    The two hold the same values: q_u8 = q_i8 + 128 saturates at the same bounds and dequantizes to the same
    (q_u8 - 128) * scale, so the model computes exactly what it did (onnxruntime, torch). OpenVINO's CPU plugin
    computes a signed-int8 activation Q/DQ next to a Concat wrongly (it requantizes with scale 1: 2026.4, see
    docs/deployment.md) and reads the uint8 form right; uint8 activations with int8 weights are also what
    onnxruntime's fused x86 kernels take. Weights stay int8 with zero point 0. TensorRT wants int8 (export.target)."""
    import numpy as np
    from onnx import numpy_helper

    quants, deqs = activation_qdq(proto)
    if not quants:
        return proto
    g = proto.graph
    if UINT8_ZERO_POINT not in {i.name for i in g.initializer}:
        g.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), UINT8_ZERO_POINT))
    for n in quants + deqs:
        if len(n.input) < 3:
            n.input.append(UINT8_ZERO_POINT)
        else:
            n.input[2] = UINT8_ZERO_POINT
    retyped = {n.output[0] for n in quants}
    keep = [v for v in g.value_info if v.name not in retyped]  # their element type changed: let inference redo them
    del g.value_info[:]
    g.value_info.extend(keep)
    used = {i for n in g.node for i in n.input}
    unused = [i for i in g.initializer if i.name not in used]
    for i in unused:  # the int8 zero points nothing reads any more
        g.initializer.remove(i)
    return proto
