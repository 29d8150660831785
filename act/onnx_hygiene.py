"""ONNX hygiene for the Q/DQ export: simplification with onnxslim that keeps every quantized layer quantized.

onnxslim folds constants (shape arithmetic, the decode's anchor tensors), removes dead nodes and merges duplicate
nodes. Two Q/DQ pairs with one scale on one tensor (the same tensor read by several quantized convs, see
act.quant.placement) become one pair, which is what TensorRT wants anyway. It never folds a weight's Q/DQ into float
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
