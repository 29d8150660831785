"""`act lint-qdq model.onnx`: does a Q/DQ ONNX have the placement TensorRT fuses without float layers or reformats?

Errors (exit code 1):
  conv_input_float     a Conv (outside the decode) whose input is not dequantized INT8
  conv_weight_float    a Conv whose weight has no DequantizeLinear
  weight_per_tensor    a Conv weight quantized per tensor (TensorRT's INT8 convs want per-output-channel, axis 0)
  zero_point           a Q/DQ with a non-zero or unsigned zero point (TensorRT is symmetric INT8 only; for the cpu
                       target: a weight Q/DQ that is not int8 with zero point 0)
  activation_int8      (cpu target) an activation Q/DQ stored as int8: OpenVINO's CPU plugin computes signed-int8
                       activations next to a Concat with the wrong scale; store them as uint8, zero point 128
  weight_range         (cpu target) weight integers beyond [-63, 63]: CPUs without VNNI sum u8 x s8 products in pairs
                       into 16 bits, which saturates (quant.weight.range int7)
  concat_scales        a Concat whose inputs are not all dequantized with one scale (requantize / reformat)
  pool_requantize      a MaxPool / Resize whose input and output are not quantized with one scale
  add_half_quantized   an Add with one quantized and one float input (the float side costs a reformat)
  qdq_in_decode        a Q/DQ after the head's last convs (the decode must stay float)
Info (exit code 0): layers kept float on purpose (quant.skip, written into the ONNX metadata by act), float ops
TensorRT runs in FP16/FP32 (attention MatMul/Softmax), the decode.

The decode is everything downstream of the head's last convs; a "last conv" is a Conv after which no other conv
follows but the DFL's fixed conv (one output channel reading a Softmax), which is part of the decode.
The target (export.target: tensorrt, or cpu for OpenVINO / onnxruntime on x86 CPUs) is read from the file's metadata
(act_target, written by act) unless given; the rules above say which target they belong to.
Exit codes: 0 clean, 1 findings, 2 unreadable input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from act.core.errors import ActError

SKIP_METADATA_KEY = "act_quant_skip"  # JSON list of module-name patterns kept float on purpose (quant.skip)
TARGETS = ("tensorrt", "cpu")
CPU_WEIGHT_MAX_INT = 63  # weights within 7 bits for CPUs without VNNI
QDQ = ("QuantizeLinear", "DequantizeLinear")
PIECES = ("Split", "Slice")  # TensorRT propagates DQ forward through them (C2f's chunk of a quantized conv output)


class LintInputError(ActError):
    exit_code = 2


@dataclass
class Finding:
    severity: str  # "error" or "info"
    code: str
    node: str
    message: str


@dataclass
class LintReport:
    path: str
    findings: List[Finding] = field(default_factory=list)
    stats: Dict[str, int] = field(default_factory=dict)
    target: str = "tensorrt"

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def clean(self) -> bool:
        return not self.errors

    def add(self, severity: str, code: str, node: str, message: str) -> None:
        self.findings.append(Finding(severity, code, node, message))

    def to_dict(self) -> Dict:
        counts: Dict[str, int] = {}
        for f in self.errors:
            counts[f.code] = counts.get(f.code, 0) + 1
        return {"path": self.path, "target": self.target, "clean": self.clean, "errors": len(self.errors),
                "infos": len(self.findings) - len(self.errors), "error_counts": counts, "stats": self.stats,
                "findings": [asdict(f) for f in self.findings]}

    def summary(self) -> Dict:
        """The short form summary.json keeps (the errors in full, infos counted)."""
        d = self.to_dict()
        d["findings"] = [asdict(f) for f in self.errors]
        d["info_codes"] = sorted({f.code for f in self.findings if f.severity == "info"})
        return d

    def text(self) -> str:
        lines = [f"{self.path} (target {self.target}): {'clean' if self.clean else f'{len(self.errors)} finding(s)'} "
                 f"({self.stats.get('conv', 0)} convs, {self.stats.get('conv_int8', 0)} INT8, "
                 f"{self.stats.get('qdq_pairs', 0)} Q/DQ pairs)"]
        for f in sorted(self.findings, key=lambda f: (f.severity != "error", f.code, f.node)):
            lines.append(f"  {f.severity:<5} {f.code:<18} {f.node}: {f.message}")
        return "\n".join(lines)


def module_path(node_name: str) -> str:
    """'/model.23/cv4.0/cv4.0.2/Conv' -> 'model.23.cv4.0.2' (torch.onnx scope names: one part per module, a nested
    Sequential's child repeating its parent's dotted name)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    comps: List[str] = []
    for part in parts:
        if comps and part.startswith(comps[-1] + "."):
            comps[-1] = part
        else:
            comps.append(part)
    return ".".join(comps)


def _load(model) :
    import onnx

    if not isinstance(model, (str, Path)):
        return model, "<model>"
    path = Path(model)
    if not path.is_file():
        raise LintInputError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path)), str(path)
    except Exception as e:
        raise LintInputError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: Dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.const: Dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = numpy_helper.to_array(a.t)
        self.float_tensors = self._float_tensors(model)

    @staticmethod
    def _float_tensors(model):
        import onnx

        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            return None
        g = inferred.graph
        floats = set()
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                 onnx.TensorProto.BFLOAT16):
                floats.add(vi.name)
        return floats

    def is_float(self, tensor: str) -> bool:
        return self.float_tensors is None or tensor in self.float_tensors

    def src(self, tensor: str):
        return self.producer.get(tensor)

    def dq_scale(self, tensor: str) -> Optional[np.ndarray]:
        """The scale of the DequantizeLinear producing `tensor`, or None if it is not dequantized."""
        n = self.src(tensor)
        while n is not None and n.op_type in PIECES:  # a piece of a dequantized tensor carries its scale
            n = self.src(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return None
        s = self.const.get(n.input[1])
        return np.asarray(s, dtype=np.float64) if s is not None else np.array([np.nan])

    def q_scales_of_readers(self, tensor: str):
        readers = self.consumers.get(tensor, [])
        if not readers or any(r.op_type != "QuantizeLinear" for r in readers):
            return None
        return [np.asarray(self.const.get(r.input[1], np.nan), dtype=np.float64) for r in readers]


def _same(scales: Sequence[np.ndarray]) -> bool:
    first = scales[0]
    return all(s.shape == first.shape and np.allclose(s, first, rtol=1e-6, atol=0) for s in scales[1:])


def _fmt_scales(scales: Iterable[np.ndarray]) -> str:
    vals = sorted({float(np.ravel(s)[0]) for s in scales})
    return ", ".join(f"{v:.4g}" for v in vals[:4]) + (" ..." if len(vals) > 4 else "")


def _zp_text(zp) -> str:
    return "no zero point (uint8 0)" if zp is None else f"{np.ravel(zp)[:3].tolist()} ({zp.dtype})"


def _weight_max_int(g: "_Graph", q) -> Optional[int]:
    """The largest |integer| a weight QuantizeLinear produces from its constant weight (None if unknown)."""
    w, s = g.const.get(q.input[0]), g.const.get(q.input[1])
    if w is None or s is None:
        return None
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 1 and s.size > 1:  # per channel on `axis` (0 for act's convs)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return int(np.abs(np.round(np.asarray(w, dtype=np.float64) / s)).max()) if w.size else 0


def lint_onnx(model: Union[str, Path, "onnx.ModelProto"], skip: Optional[Sequence[str]] = None,
              target: Optional[str] = None) -> LintReport:
    """Lint a Q/DQ ONNX (path or ModelProto). `skip`: module-name patterns kept float on purpose; default: the
    patterns act wrote into the file's metadata (act_quant_skip). `target`: tensorrt or cpu; default: the file's
    act_target metadata, else tensorrt."""
    from act.deploy.onnx_hygiene import activation_qdq
    from act.blocks.quant import matches_any

    proto, name = _load(model)
    report = LintReport(name)
    meta = {p.key: p.value for p in proto.metadata_props}
    if skip is None:
        try:
            skip = json.loads(meta.get(SKIP_METADATA_KEY, "[]"))
        except ValueError:
            skip = []
    target = target or meta.get("act_target") or "tensorrt"
    if target not in TARGETS:
        raise LintInputError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    report.target = target
    activation_nodes = {n.output[0] for group in activation_qdq(proto) for n in group}  # by output tensor
    g = _Graph(proto)
    order = g.nodes
    index = {id(n): i for i, n in enumerate(order)}

    def weight_of(n) -> Optional[np.ndarray]:
        if len(n.input) < 2:
            return None
        w = g.const.get(n.input[1])
        src = g.src(n.input[1])
        while w is None and src is not None and src.op_type in QDQ:
            w = g.const.get(src.input[0])
            src = g.src(src.input[0])
        return w

    def is_qconv(n) -> bool:
        """A conv of the network proper: any conv but the DFL's fixed expectation conv of the decode (one output
        channel, reading a Softmax)."""
        if n.op_type not in ("Conv", "ConvTranspose"):
            return False
        w = weight_of(n)
        src = g.src(n.input[0])
        return not (w is not None and w.ndim and w.shape[0] == 1 and src is not None and src.op_type == "Softmax")

    # reach[n]: a conv of the network proper follows n somewhere downstream
    reach = [False] * len(order)
    for i in range(len(order) - 1, -1, -1):
        for o in order[i].output:
            for c in g.consumers.get(o, []):
                j = index[id(c)]
                if is_qconv(c) or reach[j]:
                    reach[i] = True
                    break
            if reach[i]:
                break
    head, decode = set(), [False] * len(order)
    for i, n in enumerate(order):
        decode[i] = any((p := g.src(t)) is not None and (id(p) in head or decode[index[id(p)]]) for t in n.input)
        if n.op_type in ("Conv", "ConvTranspose") and not reach[i] and not decode[i]:
            head.add(id(n))

    stats = {"conv": 0, "conv_int8": 0, "qdq_pairs": 0, "head_convs": len(head), "decode_nodes": sum(decode)}
    for i, n in enumerate(order):
        where = n.name or f"{n.op_type}#{i}"
        op = n.op_type
        if op in QDQ:
            if op == "QuantizeLinear":
                stats["qdq_pairs"] += 1
            if decode[i]:
                report.add("error", "qdq_in_decode", where, "Q/DQ after the head's last convs: the decode (box/keypoint "
                                                            "arithmetic) must stay float")
            zp = g.const.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if target == "cpu" and n.output[0] in activation_nodes:
                if zp is None or zp.dtype != np.uint8 or np.any(zp != 128):
                    report.add("error", "activation_int8", where, f"activation stored as {_zp_text(zp)}: OpenVINO's "
                                                                  f"CPU plugin computes signed-int8 activations next "
                                                                  f"to a Concat with the wrong scale; store them as "
                                                                  f"uint8 with zero point 128 (export.target cpu)")
            elif zp is not None and (np.any(zp != 0) or zp.dtype != np.int8):
                report.add("error", "zero_point", where, f"zero point {_zp_text(zp)}; "
                                                         + ("TensorRT needs symmetric int8 (zero point 0, int8)"
                                                            if target == "tensorrt" else
                                                            "weights must be symmetric int8 (zero point 0, int8)"))
            if target == "cpu" and op == "QuantizeLinear" and n.output[0] not in activation_nodes:
                top = _weight_max_int(g, n)
                if top is not None and top > CPU_WEIGHT_MAX_INT:
                    report.add("error", "weight_range", where, f"weight integers reach {top}: CPUs without VNNI sum "
                                                               f"u8 x s8 products in pairs into 16 bits and saturate; "
                                                               f"keep them within [-63, 63] (quant.weight.range int7)")
            continue
        if decode[i]:
            continue
        if op in ("Conv", "ConvTranspose"):
            stats["conv"] += 1
            path = module_path(n.name)
            skipped = bool(skip) and matches_any(path, skip)
            x_q = g.dq_scale(n.input[0]) is not None
            w_scale = g.dq_scale(n.input[1]) if len(n.input) > 1 else None
            if x_q and w_scale is not None:
                stats["conv_int8"] += 1
            if skipped and not (x_q and w_scale is not None):
                report.add("info", "skipped", where, f"kept float on purpose (quant.skip matches {path})")
                continue
            if not x_q:
                report.add("error", "conv_input_float", where, "input is not quantized: TensorRT runs this conv in "
                                                               "float and reformats its input")
            if w_scale is None:
                report.add("error", "conv_weight_float", where, "weight is not quantized (no DequantizeLinear)")
            else:
                w = weight_of(n)
                out_ch = w.shape[0] if w is not None and w.ndim else None
                if w_scale.size == 1 and out_ch != 1:
                    report.add("error", "weight_per_tensor", where, "weight quantized per tensor; use per output "
                                                                    "channel (axis 0)")
            continue
        out_float = all(g.is_float(o) for o in n.output)
        if op == "Concat" and out_float:
            scales = [g.dq_scale(t) for t in n.input]
            if any(s is None for s in scales):
                if any(s is not None for s in scales):
                    report.add("error", "concat_scales", where, f"{sum(s is None for s in scales)} of {len(scales)} "
                                                                f"inputs are float: TensorRT reformats them")
                elif g.q_scales_of_readers(n.output[0]) is not None:
                    report.add("error", "concat_scales", where, "float inputs, quantized output: the Concat runs in "
                                                                "float and its output is requantized")
                else:
                    report.add("info", "float_op", where, "Concat of float tensors (TensorRT runs it in float)")
            elif not _same(scales):
                report.add("error", "concat_scales", where, f"inputs carry different scales ({_fmt_scales(scales)}): "
                                                            f"TensorRT requantizes instead of eliding the Concat")
            else:
                out_q = [np.asarray(g.const.get(r.input[1], np.nan), dtype=np.float64)
                         for r in g.consumers.get(n.output[0], []) if r.op_type == "QuantizeLinear"]
                if out_q and not _same([scales[0]] + out_q):
                    report.add("error", "concat_scales", where, f"output quantized with another scale than its inputs "
                                                                f"({_fmt_scales([scales[0]] + out_q)}): a requantize")
        elif op in ("MaxPool", "Resize") and out_float:
            s_in = g.dq_scale(n.input[0])
            s_out = g.q_scales_of_readers(n.output[0])
            if s_in is None and s_out is None:
                report.add("info", "float_op", where, f"{op} in float")
            elif s_in is None or s_out is None or not _same([s_in] + s_out):
                report.add("error", "pool_requantize", where, f"{op} input and output are not quantized with one "
                                                              f"scale: TensorRT runs it in float or requantizes")
        elif op in ("Add", "Sub") and out_float:
            q = [g.dq_scale(t) is not None for t in n.input]
            const = [t in g.const for t in n.input]
            if any(q) and not all(a or c for a, c in zip(q, const)):
                report.add("error", "add_half_quantized", where, "one input quantized, the other float: TensorRT "
                                                                 "dequantizes to float for this Add")
            elif not any(q) and not any(const):
                report.add("info", "float_op", where, f"{op} of float tensors (TensorRT runs it in FP16/FP32; "
                                                      f"quantized inputs would let it run INT8)")
        elif op in ("MatMul", "Gemm", "Softmax") and out_float:
            if not all(g.dq_scale(t) is not None for t in n.input[:2]):
                report.add("info", "float_op", where, f"{op} runs in FP16/FP32 (not quantized)")
    report.stats = stats
    if stats["conv"] and not stats["qdq_pairs"]:
        report.add("error", "conv_input_float", name, "the model holds no Q/DQ at all (not a Q/DQ export)")
    return report


def main_lint(path: str, as_json: bool = False, skip: Optional[List[str]] = None,
              target: Optional[str] = None) -> int:
    """CLI body: prints the report, returns 0 clean / 1 findings (2 for bad input comes as LintInputError)."""
    report = lint_onnx(path, skip=skip, target=target)
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.text())
    return 0 if report.clean else 1
