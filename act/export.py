"""Q/DQ ONNX export of a fake-quantized student, with Ultralytics metadata, and the onnxruntime parity check.

torch's fake_quantize_per_* ops export to QuantizeLinear/DequantizeLinear pairs (int8, zero point 0; weights
per-channel on axis 0). The model family switches the head to its export mode and traces it (Ultralytics: its own
export mode and torch2onnx), so the file holds the float decode and one output (B, 4+nc(+nk), anchors), as
`yolo export format=onnx` gives, and `YOLO("student.onnx")` loads it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from act.errors import ActError, ParityError, ResourceError
from act.fileio import atomic_write_bytes, describe_os_error, os_error_in


def _export_copy(student: nn.Module) -> nn.Module:
    """CPU FP32 eval copy, hooks removed, quantizer scales frozen to constants."""
    from act.quant import freeze

    model = copy.deepcopy(student).cpu().float().eval()
    for m in model.modules():
        m._forward_hooks.clear()
    return freeze(model)


def export_onnx(student: nn.Module, path: Path, family, imgsz: int, batch: int = 1, opset: int = 17,
                dynamic: bool = False, metadata: Optional[Dict] = None, simplify: bool = False,
                skip: Sequence[str] = ()) -> Path:
    """Q/DQ ONNX of the student. simplify: onnxslim (constant folding, duplicate Q/DQ merged; every Q/DQ kept, see
    act.onnx_hygiene). skip: module-name patterns kept float on purpose, written into the metadata for the linter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _export_copy(student)
    family.prepare_for_export(model, dynamic=dynamic)
    im = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        model(im)  # dry run: builds the anchors for this shape
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
    tmp = path.with_suffix(".tmp.onnx")
    try:
        family.export_onnx(model, im, tmp, opset=opset, input_names=["images"], output_names=["output0"], dynamic=axes)
        proto = onnx.load(str(tmp))
        if simplify:
            from act.onnx_hygiene import simplify_qdq

            proto = simplify_qdq(proto)
        meta = family.export_metadata(model, imgsz, batch, metadata)
        meta["args"]["dynamic"] = dynamic
        meta["args"]["int8"] = any(isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "weight_quantizer")
                                   for m in model.modules())  # an FP32 stage of a staged run exports float
        from act.lint import SKIP_METADATA_KEY

        meta[SKIP_METADATA_KEY] = json.dumps(list(skip))
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, str(v)
        onnx.checker.check_model(proto, full_check=True)
        atomic_write_bytes(path, proto.SerializeToString(), what="ONNX file")  # (a previous export stays intact)
    except onnx.checker.ValidationError as e:
        raise ActError(f"exported ONNX failed onnx.checker: {e}") from e
    except ActError:
        raise
    except Exception as e:
        os_err = os_error_in(e)
        if os_err is None:
            raise
        raise ResourceError(describe_os_error(os_err, tmp, "write the ONNX export to")) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def torch_outputs(student: nn.Module, family, images: torch.Tensor) -> np.ndarray:
    """The student's exported-form output (decoded head) on `images`, in torch."""
    model = _export_copy(student)
    family.prepare_for_export(model)
    with torch.no_grad():
        out = model(images.float().cpu())
    return family.decoded(out).numpy()


def onnx_outputs(path: Path, images: torch.Tensor, batch: Optional[int] = None, exact: bool = True) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        # No graph rewrites: Q/DQ run as written (float emulation), which is what the torch fake-quant computes.
        # With optimizations on, onnxruntime fuses DQ->Conv->Q into integer kernels (QLinearConv) with their own
        # rounding of bias and output, as a deployment runtime would.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    x = images.float().cpu().numpy()
    step = fixed or batch or len(x)
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        if fixed and len(chunk) < fixed:  # pad the last chunk for a fixed-batch model
            chunk = np.concatenate([chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        outs.append(sess.run(None, {inp.name: chunk})[0][: len(x) - i])
    return np.concatenate(outs)


def parity(student: nn.Module, path: Path, family, images: torch.Tensor, tolerance: float = 3e-2,
           raise_on_fail: bool = True) -> Dict[str, float]:
    """Compare onnxruntime with the torch student on real images.

    Fake-quant in torch and QuantizeLinear in onnxruntime round the same way, but float sums differ in the last bits,
    so a value on a rounding boundary can land one quantization step apart and the flip travels downstream. The check
    therefore bounds the relative L2 error (default 3%, see ExportConfig.parity_tolerance) and reports the worst
    element too.
    """
    t = torch_outputs(student, family, images)
    o = onnx_outputs(path, images)
    if t.shape != o.shape:
        raise ParityError(f"ONNX output shape {o.shape} != torch output shape {t.shape}")
    diff = o.astype(np.float64) - t.astype(np.float64)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(t), 1e-12))
    opt = onnx_outputs(path, images, exact=False).astype(np.float64)
    rel_opt = float(np.linalg.norm(opt - t) / max(np.linalg.norm(t), 1e-12))
    res = {
        "images": int(len(images)),
        "rel_l2": rel,
        "rel_l2_ort_optimized": rel_opt,
        "max_abs": float(np.abs(diff).max()),
        "mean_abs": float(np.abs(diff).mean()),
        "tolerance": tolerance,
        "passed": bool(rel <= tolerance),
    }
    if raise_on_fail and not res["passed"]:
        raise ParityError(
            f"{path}: onnxruntime disagrees with the torch student beyond rounding: relative L2 error {rel:.3g} > "
            f"{tolerance:g} (max abs {res['max_abs']:.3g}). The export is not trustworthy."
        )
    return res


def qdq_summary(path: Path) -> Dict[str, int]:
    """Counts of Q/DQ nodes and quantized convs in an ONNX file."""
    g = onnx.load(str(path)).graph
    producers = {o: n for n in g.node for o in n.output}
    ops = [n.op_type for n in g.node]
    conv_total = conv_q = 0
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        conv_total += 1
        srcs = [producers.get(i) for i in n.input[:2]]
        if all(s is not None and s.op_type == "DequantizeLinear" for s in srcs):
            conv_q += 1
    return {
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
        "conv_total": conv_total,
        "conv_quantized": conv_q,
    }


def lint_after_export(path: Path, quantized: bool = True) -> Dict:
    """The Q/DQ placement linter (act.lint) on a fresh export; prints the findings if any. Returns its summary.
    A float export (quant off, e.g. a prune stage) has no placement to lint: an info-only summary."""
    from act.lint import lint_onnx

    if not quantized:
        return {"path": str(path), "clean": True, "errors": 0, "infos": 1, "error_counts": {}, "stats": {},
                "findings": [], "info_codes": ["not_quantized"],
                "skipped": "not a quantized model (quant disabled): no Q/DQ placement to lint"}

    report = lint_onnx(path)
    if not report.clean:
        print(f"act: warning: the Q/DQ linter found {len(report.errors)} placement problem(s) TensorRT will not fuse:\n"
              + "\n".join(report.text().splitlines()[1:11]))
    return report.summary()
