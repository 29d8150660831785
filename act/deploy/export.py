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

from act.core.errors import ActError, ParityError, ResourceError
from act.core.fileio import atomic_write_bytes, describe_os_error, os_error_in


def _export_copy(student: nn.Module) -> nn.Module:
    """CPU FP32 eval copy, hooks removed, quantizer scales frozen to constants."""
    from act.blocks.quant import freeze

    model = copy.deepcopy(student).cpu().float().eval()
    for m in model.modules():
        m._forward_hooks.clear()
    return freeze(model)


TARGET_METADATA_KEY = "act_target"  # export.target the file was made for (the linter's rules follow it)


def export_onnx(student: nn.Module, path: Path, family, imgsz: int, batch: int = 1, opset: int = 17,
                dynamic: bool = False, metadata: Optional[Dict] = None, simplify: bool = False,
                skip: Sequence[str] = (), target: str = "tensorrt") -> Path:
    """Q/DQ ONNX of the student. simplify: onnxslim (constant folding, duplicate Q/DQ merged; every Q/DQ kept, see
    act.deploy.onnx_hygiene). skip: module-name patterns kept float on purpose, written into the metadata for the linter.
    target: export.target; `cpu` stores activation Q/DQ as uint8 with zero point 128 (the same values)."""
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
            from act.deploy.onnx_hygiene import simplify_qdq

            proto = simplify_qdq(proto)
        if target == "cpu":
            from act.deploy.onnx_hygiene import activations_as_uint8

            activations_as_uint8(proto)
        meta = family.export_metadata(model, imgsz, batch, metadata)
        meta["args"]["dynamic"] = dynamic
        meta["args"]["int8"] = any(isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "weight_quantizer")
                                   for m in model.modules())  # an FP32 stage of a staged run exports float
        from act.deploy.lint import SKIP_METADATA_KEY

        meta[SKIP_METADATA_KEY] = json.dumps(list(skip))
        meta[TARGET_METADATA_KEY] = target
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


SCORE_BRANCHES = ("cls",)  # branches holding probabilities: compared as logits


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def compare(runtime: str, ref: np.ndarray, got: np.ndarray, branches: Dict[str, slice],
            branch_tolerance: Dict[str, float], tolerance: Optional[float] = None) -> Dict:
    """A runtime's outputs against the torch student's: relative L2 of the whole output (bounded by `tolerance` if
    given) and of each output branch (box, cls, kpt: channel slices of the decoded output, act.core.family), each
    bounded by its `branch_tolerance`. Class scores are compared as logits: as probabilities a weak model's scores
    are all near zero and a rounding flip weighs as much as a dead branch; as logits a healthy export measured
    0.02 and a dead class branch 0.22-0.25."""
    if ref.shape != got.shape:
        raise ParityError(f"{runtime}: output shape {got.shape} != torch output shape {ref.shape}")
    ref, got = ref.astype(np.float64), got.astype(np.float64)

    def rel(a, b):
        return float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12))

    diff = got - ref
    per_branch = {name: rel(_logit(ref[:, sl]), _logit(got[:, sl])) if name in SCORE_BRANCHES else
                  rel(ref[:, sl], got[:, sl]) for name, sl in branches.items()}
    failed = [name for name, e in per_branch.items() if name in branch_tolerance and e > branch_tolerance[name]]
    res = {"runtime": runtime, "rel_l2": rel(ref, got), "max_abs": float(np.abs(diff).max()),
           "mean_abs": float(np.abs(diff).mean()), "branches": per_branch,
           "branch_tolerance": {k: v for k, v in branch_tolerance.items() if k in branches}, "failed_branches": failed}
    if tolerance is not None:
        res["tolerance"] = tolerance
        if res["rel_l2"] > tolerance:
            failed.append("all")
    res["passed"] = not failed
    return res


def parity_message(path: Path, res: Dict) -> str:
    """What a failed comparison says: the runtime, each failing branch with its error and bound."""
    parts = []
    for b in res["failed_branches"]:
        err, tol = (res["rel_l2"], res["tolerance"]) if b == "all" else (res["branches"][b],
                                                                        res["branch_tolerance"][b])
        parts.append(f"{'the whole output' if b == 'all' else f'the {b} branch'}: relative L2 {err:.3g} > {tol:g}")
    return (f"{path}: {res['runtime']} disagrees with the torch student beyond rounding on "
            + "; ".join(parts) + f" (max abs {res['max_abs']:.3g}). The export is not trustworthy there.")


def parity(student: nn.Module, path: Path, family, images: torch.Tensor, tolerance: float = 3e-2,
           raise_on_fail: bool = True, branch_tolerance: Optional[Dict[str, float]] = None,
           reference: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Compare onnxruntime with the torch student on real images, on the whole output and per output branch.

    Fake-quant in torch and QuantizeLinear in onnxruntime round the same way, but float sums differ in the last bits,
    so a value on a rounding boundary can land one quantization step apart and the flip travels downstream. The check
    therefore bounds the relative L2 error (default 3%, see ExportConfig.parity_tolerance) of the whole output and of
    each branch (ExportConfig.branch_tolerance: a dead class branch is 1 of 56 channels), and reports the worst
    element too. reference: the torch outputs, if already computed (torch_outputs).
    """
    t = torch_outputs(student, family, images) if reference is None else reference
    o = onnx_outputs(path, images)
    if branch_tolerance is None:
        from act.core.config import ExportConfig

        branch_tolerance = ExportConfig().branch_tolerance
    res = compare("onnxruntime", t, o, family.output_branches(student), branch_tolerance, tolerance)
    opt = onnx_outputs(path, images, exact=False).astype(np.float64)
    res["rel_l2_ort_optimized"] = float(np.linalg.norm(opt - t) / max(np.linalg.norm(t), 1e-12))
    res["images"] = int(len(images))
    if raise_on_fail and not res["passed"]:
        raise ParityError(parity_message(path, res))
    return res


def openvino_parity(student: nn.Module, ir_path: Path, family, images: torch.Tensor,
                    branch_tolerance: Dict[str, float], precision: str = "f32",
                    reference: Optional[np.ndarray] = None) -> Dict:
    """OpenVINO (the IR as deployed, INT8 kernels fused) against the torch student, per output branch."""
    from act.deploy import openvino

    t = torch_outputs(student, family, images) if reference is None else reference
    got, info = openvino.outputs(ir_path, images, precision)
    res = compare("openvino", t, got, family.output_branches(student), branch_tolerance)
    res.update(info)
    res["images"] = int(len(images))
    return res


def verify_openvino(onnx_path: Path, student: nn.Module, family, images: torch.Tensor, ex,
                    reference: Optional[np.ndarray] = None, log=print) -> Dict:
    """The OpenVINO side of an export (`ex`: the run's ExportConfig): with `export.openvino.enabled` (auto: with
    export.target cpu) the IR `<stem>_openvino_model/` is written and must match the torch student per branch (a
    ParityError otherwise, after the caller wrote the summary: see `raise_if_failed`); without it, when OpenVINO is
    installed, the same conversion is checked in a temporary folder and a mismatch is reported, not fatal (a
    TensorRT-target model on a CPU without VNNI overflows there: docs/deployment.md)."""
    import shutil
    import tempfile

    from act.deploy import openvino
    from act.core.optional_deps import openvino_available

    if not openvino_available():
        return {"skipped": "openvino is not installed (pip install act[openvino])"}
    deliver = ex.openvino.enabled is True or (ex.openvino.enabled == "auto" and ex.target == "cpu")
    tmp = None
    if deliver:
        xml = openvino.write_ir(onnx_path)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="act_openvino_"))
        xml = openvino.write_ir(onnx_path, tmp / "ir")
    try:
        par = openvino_parity(student, xml, family, images, ex.openvino.parity_tolerance, ex.openvino.precision,
                              reference)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {"path": str(xml.parent) if deliver else None, "parity": par, "required": deliver,
           "target": ex.target}
    errs = ", ".join(f"{k} {v:.3g}" for k, v in par["branches"].items())
    if deliver:
        log(f"act: wrote {xml.parent} (OpenVINO {par['runtime_precision']}: per-branch rel L2 {errs})")
    elif not par["passed"]:
        log(f"act: note: OpenVINO on this CPU does not reproduce this {ex.target}-target model ({errs}); for CPU "
            f"deployment set export.target=cpu (docs/deployment.md)")
    return out


def raise_if_failed(path: Path, onnx_parity: Dict, openvino_result: Optional[Dict] = None) -> None:
    """ParityError (exit 3) for the first runtime whose check failed and counts: onnxruntime always, OpenVINO when
    its IR is delivered."""
    if not onnx_parity["passed"]:
        raise ParityError(parity_message(path, onnx_parity))
    ov = openvino_result or {}
    if ov.get("required") and not ov["parity"]["passed"]:
        raise ParityError(parity_message(Path(ov["path"]), ov["parity"]))


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
    """The Q/DQ placement linter (act.deploy.lint) on a fresh export; prints the findings if any. Returns its summary.
    A float export (quant off, e.g. a prune stage) has no placement to lint: an info-only summary."""
    from act.deploy.lint import lint_onnx

    if not quantized:
        return {"path": str(path), "clean": True, "errors": 0, "infos": 1, "error_counts": {}, "stats": {},
                "findings": [], "info_codes": ["not_quantized"],
                "skipped": "not a quantized model (quant disabled): no Q/DQ placement to lint"}

    report = lint_onnx(path)
    if not report.clean:
        print(f"act: warning: the Q/DQ linter found {len(report.errors)} placement problem(s) TensorRT will not fuse:\n"
              + "\n".join(report.text().splitlines()[1:11]))
    return report.summary()
