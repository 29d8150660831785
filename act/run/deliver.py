"""Delivery: from a run's chosen checkpoint to what the user takes away.

`deliver(run, ...)` loads the checkpoint (best.pt, or ptq.pt), writes summary.json, exports the Q/DQ ONNX for
export.target (act.deploy.export), verifies it against the torch student per output branch in each runtime installed
(onnxruntime always, OpenVINO when present: a run whose deliverable does not match fails, exit 3), lints the Q/DQ
placement (act.deploy.lint), writes the OpenVINO IR and builds the TensorRT engine when asked (act.deploy.openvino, act.deploy.tensorrt)
and writes the report (act.run.report).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

import torch

from act.blocks import quant as Q
from act.blocks.checkpoint import load_checkpoint
from act.blocks.data import load_images, resolve_source
from act.core.errors import ActError
from act.deploy.export import (export_onnx, lint_after_export, parity, qdq_summary, raise_if_failed, torch_outputs,
                        verify_openvino)
from act.core.fileio import atomic_write_text
from act.blocks.quant.health import collapsed_quantizers, format_report
from act.run.stream import write_skipped


def write_summary(out: Path, summary: Dict[str, Any]) -> None:
    atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=2, default=str), what="summary")


def parity_images(cfg, letterbox_fn=None) -> torch.Tensor:
    """The images the ONNX is checked on: the first of the pool (random ones if the pool cannot be read)."""
    n = cfg.export.parity_images
    try:
        paths = resolve_source(cfg.data.train)[:n]
        return load_images(paths, cfg.data.imgsz, letterbox_fn)
    except ActError:
        return torch.rand(n, 3, cfg.data.imgsz, cfg.data.imgsz)


def summarize(run, before, it: int, train_time: float, student, extra: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json's content before export: metrics before / best / last, settings, health, decisions."""
    cfg = run.cfg
    after = run.history[-1].get("eval", {}) if len(run.history) > 1 else {}
    bad_q = collapsed_quantizers(student) if cfg.quant.enabled else {}
    best_eval = next((h["eval"] for h in run.history if h.get("iteration") == run.best_iteration and "eval" in h),
                     after)
    summary: Dict[str, Any] = {
        "teacher": str(run.source.path),
        "task": run.task,
        "iterations": it,
        "best_iteration": run.best_iteration,
        "metric": run.metric,
        "metrics": {"before": before, "best": best_eval, "last": after},
        "time_s": {"train": round(train_time, 2)},
        "nodes": [n.name for n in run.nodes],
        "quantized_layers": len(Q.quantized_modules(run.student)),
        "bad_images": len(run.bad_images),
        "skipped_images": {"count": len(run.bad_images),
                           "file": str(write_skipped(run.out, run.bad_images)) if run.bad_images else None},
        "nonfinite_steps": run.nonfinite_steps,
        "quant_health": {"collapsed": len(bad_q), "quantizers": bad_q} if cfg.quant.enabled else None,
        "settings": cfg.dump(),
    }
    if getattr(run.student, "act_placement", None):
        summary["placement"] = run.student.act_placement  # Q/DQ placement rules and shared-scale groups
    if run.fidelity_paths:
        summary["fidelity_images"] = {"count": len(run.fidelity_paths), "held_out": run.fidelity_held_out,
                                      "first": str(run.fidelity_paths[0])}
    if run.auto_skip:
        summary["auto_skip"] = run.auto_skip
    if run.decisions:
        summary["decisions"] = run.decisions
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(summary.get(k), dict):
            summary[k].update(v)
        else:
            summary[k] = v
    if run.bad_images:
        print(f"act: skipped {len(run.bad_images)} unusable image(s); list in {run.out / 'skipped_images.txt'}")
    if bad_q:
        print("\n".join([f"act: warning: {len(bad_q)} quantizer range(s) of the exported student collapsed:"]
                        + format_report(bad_q)))
    return summary


def export_and_verify(run, student, summary: Dict[str, Any]) -> None:
    """student.onnx (Q/DQ for export.target, Ultralytics metadata), its parity with the torch student per branch in
    onnxruntime and OpenVINO, the lint, the OpenVINO IR, the engine."""
    cfg = run.cfg
    ex = cfg.export
    t1 = time.time()
    onnx_path = export_onnx(student, run.out / "student.onnx", run.family, cfg.data.imgsz,
                            ex.batch, ex.opset, ex.dynamic,
                            metadata={"act": json.dumps({"best_iteration": run.best_iteration})},
                            simplify=ex.simplify, skip=list(cfg.quant.skip) + list(run.family.float_patterns),
                            target=ex.target)
    images = parity_images(cfg, run.family.letterbox)
    reference = torch_outputs(student, run.family, images)
    par = parity(student, onnx_path, run.family, images, ex.parity_tolerance, raise_on_fail=False,
                 branch_tolerance=ex.branch_tolerance, reference=reference)
    summary["onnx"] = {"path": str(onnx_path), "target": ex.target, "parity": par, "qdq": qdq_summary(onnx_path)}
    summary["onnx"]["lint"] = lint_after_export(onnx_path, quantized=cfg.quant.enabled)
    summary["openvino"] = verify_openvino(onnx_path, student, run.family, images, ex, reference)
    if ex.tensorrt.enabled:
        from act.deploy.tensorrt import build_engine

        summary["engine"] = build_engine(onnx_path, onnx_path.with_suffix(".engine"), ex.tensorrt)
    summary["time_s"]["export"] = round(time.time() - t1, 2)
    write_summary(run.out, summary)
    raise_if_failed(onnx_path, par, summary["openvino"])  # ParityError (exit 3), the summary kept


def deliver(run, log, before, it: int, train_time: float, checkpoint: str, extra: Dict[str, Any]) -> Dict[str, Any]:
    """Summary, Q/DQ ONNX export of `checkpoint` and its parity check, report; writes summary.json."""
    cfg = run.cfg
    t0 = time.time()
    best_student = load_checkpoint(run.out / checkpoint)["model"].to(run.device)
    summary = summarize(run, before, it, train_time, best_student, extra)
    if cfg.export.onnx:
        export_and_verify(run, best_student, summary)
    # end to end: from the start of the run (setup, calibration, training, evaluations) to the delivered files
    end_to_end = train_time + time.time() - t0
    summary["time_s"]["end_to_end"] = round(end_to_end, 2)
    speed = summary.get("speed") or {}
    if speed.get("images"):
        speed["end_to_end_images_per_s"] = round(speed["images"] / end_to_end, 2)
    if cfg.report.enabled:
        from act.run.report import write_report

        summary["report"] = write_report(run.out, summary, runner=run, log=log, student=best_student)
    write_summary(run.out, summary)
    if run.metric and run.best_metric is not None:
        print(f"act: done. best {run.metric}: {run.best_metric:.4f} at iteration {run.best_iteration}")
    else:
        print(f"act: done at iteration {run.best_iteration} (no eval.metric: best.pt is the last student)")
    print(f"act: outputs in {run.out}  (ONNX: {run.out / 'student.onnx'}; "
          f"TensorBoard: tensorboard --logdir {run.log_dir()})")
    return summary
