"""Measuring one frontier point, the same way for every point: MACs and parameters (torch-pruning's counter, of the
float structure at the point's input size), batch-1 latency of its ONNX in every installed runtime, label-free
fidelity against the FP32 teacher at data.imgsz (the student at its own input size, its detections scaled to the
teacher's letterbox), labeled mAP with eval.data (Ultralytics' validator on the ONNX at its input size), and the eval
callback's metrics. The accuracy that ranks points is the labeled metric with eval.data, else fidelity."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from act.core.config import FrontierPoint, RunConfig
from act.core.optional_deps import openvino_available
from act.orchestrate.pareto import mark_pareto


def float_structure(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose fake-quantized convs / linears are plain ones (the same weights and shapes), so that a
    MAC counter keyed on module types counts them: an INT8 point has the MACs of its float structure."""
    import copy

    from torch import nn

    model = copy.deepcopy(model)
    for m in model.modules():
        for base in (nn.Conv2d, nn.Linear):
            if isinstance(m, base) and type(m) is not base:
                m.__class__ = base
    return model


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ranking_runtime(setting: str) -> str:
    if setting != "auto":
        return setting
    return "openvino" if openvino_available() else "onnxruntime"


class Measurer:
    def __init__(self, cfg: RunConfig, teacher, log: Callable[[str], None] = print):
        from act.blocks.evaluate import default_metric
        from act.blocks.prune import model_cost

        self.cfg = cfg
        self.teacher, self.family, self.src = teacher
        self.task = self.family.task(self.teacher)
        self.log = log
        self.base = cfg.data.imgsz
        self.runtime = ranking_runtime(cfg.frontier.runtime)
        kind = "pose" if self.task == "pose" else "box"
        self.metric = cfg.frontier.metric or (default_metric(self.task, self.family) if cfg.eval.data
                                              else f"fidelity_{kind}_map50_95")
        if not cfg.eval.data and not cfg.eval.fidelity.enabled and not cfg.eval.callback:
            from act.core.errors import ConfigError

            raise ConfigError("invalid config:\n  eval: the frontier needs an accuracy to rank points: keep "
                              "eval.fidelity.enabled: true (label-free) or set eval.data")
        self.base_macs, self.base_params = model_cost(self.teacher, self.base, self.family)
        self._fidelity: Dict[int, Any] = {}
        self._callback = None
        if cfg.eval.callback:
            from act.blocks.evaluate import load_callback

            self._callback = load_callback(cfg.eval.callback)

    # ---- one point -------------------------------------------------------------------------------------------------
    def fidelity(self, imgsz: int):
        if imgsz not in self._fidelity:
            from act.blocks.fidelity import FidelityEvaluator
            from act.run.artifacts import fidelity_paths

            fc = self.cfg.eval.fidelity
            paths, held_out = fidelity_paths(fc.source or self.cfg.data.train, fc.images)
            self._fidelity[imgsz] = FidelityEvaluator.from_paths(
                self.teacher, paths, self.base, self.task, family=self.family, student_imgsz=imgsz,
                batch_size=fc.batch_size or self.cfg.eval.batch_size, teacher_conf=fc.teacher_conf,
                held_out=held_out)
        return self._fidelity[imgsz]

    def latency(self, onnx: Path) -> Dict[str, Any]:
        from act.deploy.latency import openvino_latency, ort_latency, tensorrt_latency

        runs, rounds = self.cfg.frontier.latency_runs, self.cfg.frontier.latency_rounds
        out: Dict[str, Any] = {}
        for name, timer in (("openvino", openvino_latency), ("onnxruntime", ort_latency),
                            ("tensorrt", tensorrt_latency)):
            best = None
            for _ in range(rounds):
                res = timer(onnx, runs=runs)
                if res is None:
                    break
                if best is None or res["median_ms"] < best["median_ms"]:
                    best = res
            if best is not None:
                out[name] = {**best, "rounds": rounds}
        return out

    def measure(self, p: FrontierPoint, made, reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        from act.blocks.evaluate import CocoEvaluator, EvalContext
        from act.blocks.prune import model_cost

        t0 = time.time()
        self.log(f"act frontier: measuring {p.name} ({made.onnx})")
        macs, params = model_cost(float_structure(made.float_model), p.imgsz, self.family)
        metrics: Dict[str, float] = {}
        ctx = EvalContext(torch.device("cpu"), p.imgsz, 0, made.run_dir)
        if self.cfg.eval.fidelity.enabled:
            res = self.fidelity(p.imgsz)(str(made.onnx), ctx)
            metrics.update({k: v for k, v in res.items() if k.startswith("fidelity_")})
        if self.cfg.eval.data:
            ev = self.cfg.eval
            coco = CocoEvaluator(ev.data, self.task, p.imgsz, ev.batch_size, ev.max_images, ev.split,
                                 workdir=made.run_dir, rect=False, family=self.family)
            metrics.update(coco(str(made.onnx), ctx))
        if self._callback is not None:
            metrics.update({k: float(v) for k, v in (self._callback(str(made.onnx), ctx) or {}).items()})
        return {
            **p.model_dump(mode="json"), "name": p.name,
            "onnx": str(made.onnx), "run_dir": str(made.run_dir), "command": made.command,
            "macs_g": round(macs / 1e9, 4), "params_m": round(params / 1e6, 4),
            "macs_ratio": round(macs / self.base_macs, 4), "params_ratio": round(params / self.base_params, 4),
            "latency": self.latency(made.onnx), "metrics": metrics,
            "host": self.host(),
            "measure_s": round(time.time() - t0, 1),
        }

    def remeasure_latency(self, row: Dict[str, Any], made) -> Dict[str, Any]:
        """A measured point with its latency measured again here (and this host recorded)."""
        self.log(f"act frontier: timing {row['name']} again")
        return {**row, "latency": self.latency(made.onnx), "host": self.host()}

    @staticmethod
    def host() -> Dict[str, str]:
        return {"cpu": cpu_name(), "node": platform.node(), "torch": torch.__version__}

    def describe(self, row: Dict[str, Any]) -> str:
        lat = row.get("latency") or {}
        parts = [f"{row['macs_ratio']:.2f}x MACs"]
        for rt in ("openvino", "onnxruntime", "tensorrt"):
            if lat.get(rt):
                parts.append(f"{rt} {lat[rt]['median_ms']:.1f} ms")
        m = row.get("metrics", {})
        for k in (self.metric, "fidelity_pose_map50_95", "fidelity_box_map50_95"):
            if k in m:
                parts.append(f"{k} {m[k]:.4f}")
                break
        return ", ".join(parts)

    # ---- all points --------------------------------------------------------------------------------------------------
    def summarize(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        return summarize(rows, self.metric, self.runtime)


def summarize(rows: List[Dict[str, Any]], metric: str, runtime: str) -> Dict[str, Any]:
    """Each row gets accuracy, drop (vs the first row, the FP32 teacher at data.imgsz), latency_ms in the ranking
    runtime, latency_ratio, cost and its Pareto mark."""
    ref = rows[0] if rows else None
    if ref is not None and metric not in ref.get("metrics", {}):
        from act.core.errors import ConfigError

        raise ConfigError(f"invalid config:\n  frontier.metric: {metric!r} is not measured; the points have "
                          f"{sorted(ref.get('metrics', {}))}")
    ref_acc = ref["metrics"].get(metric) if ref else None
    ref_ms = ((ref or {}).get("latency", {}).get(runtime) or {}).get("median_ms")
    for r in rows:
        acc = r.get("metrics", {}).get(metric)
        r["accuracy"] = acc
        r["drop"] = (ref_acc - acc) if acc is not None and ref_acc is not None else None
        ms = (r.get("latency", {}).get(runtime) or {}).get("median_ms")
        r["latency_ms"] = ms
        r["latency_ratio"] = round(ms / ref_ms, 3) if ms and ref_ms else None
        r["cost"] = ms if ms is not None else r["macs_ratio"]
    mark_pareto(rows)
    return {"points": rows, "metric": metric, "runtime": runtime,
            "teacher": {"name": ref["name"], "accuracy": ref_acc, "latency_ms": ref_ms} if ref else None}
