"""Staged runs: `stages:` in the config runs e.g. prune -> quant in one `act compress`, each stage distilling from the
same frozen teacher and starting from the previous stage's best student.

    stages:
      - {type: prune, target: 0.6, steps: 4, train: {iterations: 800, lr: 1.0e-4}}
      - {type: quant, train: {iterations: 300}}

Each stage is a training run of its own (`StageRun`, a Trainer with its stage kind's hooks, act.orchestrate.stage_kinds) in output_dir/stages/<n>_<name>/ (best.pt, last.pt,
student.onnx, summary.json), logging to output_dir/tensorboard/<n>_<name>. output_dir/stages.json records the stages
done, so `--resume` skips them and resumes the current one from its last.pt (a pruned student is rebuilt from the
module pickled in the checkpoint). The last stage's best.pt, last.pt and student.onnx are copied to output_dir, and
output_dir/summary.json lists every stage: params, MACs, onnxruntime CPU latency of its ONNX, metrics.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from act.blocks import dist as D
from act.run import runstate
from act.run.build import build_student
from act.blocks.checkpoint import load_checkpoint
from act.core.config import RunConfig, validate_config
from act.run.deliver import write_summary
from act.core.errors import ActError, Interrupted
from act.deploy.latency import openvino_latency, ort_latency
from act.blocks.prune import model_cost
from act.run.runner import fmt_metrics as _fmt
from act.blocks.sparsity import SparsityMasks
from act.orchestrate.stage_kinds import SparsityStage, StageKind, stage_hooks
from act.run.trainer import Trainer

STAGE_FILE = "stages.json"


def stage_dir(out: Path, index: int, stage) -> Path:
    return out / "stages" / f"{index + 1}_{stage.label}"


def stage_config(cfg: RunConfig, index: int, out: Path) -> RunConfig:
    """The run config of one stage: its train overrides over the top-level train section, quantization only in a
    quant stage, its own output folder; the teacher/student 'before' evaluation only in the first stage."""
    stage = cfg.stages[index]
    raw = cfg.dump()
    raw["stages"] = None
    over = {k: v for k, v in stage.train.model_dump(mode="json").items() if v is not None}
    train = dict(raw["train"])
    if "iterations" in over:
        train["epochs"] = None
    if "epochs" in over:
        train["iterations"] = None
    train.update(over)
    raw["train"] = train
    raw["quant"]["enabled"] = stage.type == "quant"
    raw["output_dir"] = str(stage_dir(out, index, stage))
    if index > 0:
        raw["eval"]["before"] = False
    return validate_config(raw)


class StageRun(Trainer):
    """One stage of a staged run: a Trainer whose student starts from the previous stage's best.pt, with the stage
    kind's hooks (act.orchestrate.stage_kinds), logging under the staged run's TensorBoard folder, and the stage's cost (params,
    MACs, onnxruntime latency) in its summary."""

    def __init__(self, cfg: RunConfig, stages: List, index: int, start_from: Optional[Path], log_root: Path,
                 train_loader=None, eval_fn=None):
        self.kind: StageKind
        hooks = stage_hooks(stages, index)
        super().__init__(cfg, train_loader=train_loader, eval_fn=eval_fn, hooks=hooks)
        self.kind = hooks[0]
        self.stages, self.index, self.stage = stages, index, stages[index]
        self.start_from = start_from
        self.log_root = log_root

    def log_dir(self) -> Path:
        return self.log_root / f"{self.index + 1}_{self.stage.label}"

    def build_student(self) -> nn.Module:
        if self.start_from is not None:
            base = load_checkpoint(self.start_from)["model"].float()
        else:
            base = self.kind.build_student(self.context) or copy.deepcopy(self.teacher)
        base = self.kind.prepare(self.context, base)
        self.float_cost = model_cost(base, self.cfg.data.imgsz, self.family)
        return build_student(self.teacher, self.cfg, self.family, base=base)

    def setup_models(self) -> None:
        super().setup_models()
        self.teacher_cost = model_cost(self.teacher, self.cfg.data.imgsz, self.family)

    def finish(self, log, before, it: int, train_time: float, checkpoint: Optional[str] = None,
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        extra = dict(extra or {})
        extra["stage"] = {k: v for h in self.hooks if isinstance(h, StageKind) for k, v in h.info(self.context).items()}
        summary = super().finish(log, before, it, train_time, checkpoint=checkpoint, extra=extra)
        best = load_checkpoint(self.out / (checkpoint or self.CHECKPOINT))["model"].float()
        imgsz = self.cfg.data.imgsz
        macs, params = self.float_cost if self.cfg.quant.enabled else model_cost(best, imgsz, self.family)
        t_macs, t_params = self.teacher_cost
        summary["cost"] = {"imgsz": imgsz, "macs": macs, "params": params, "gmacs": round(macs / 1e9, 4),
                           "macs_ratio": round(macs / t_macs, 4), "params_ratio": round(params / t_params, 4),
                           "teacher_macs": t_macs, "teacher_params": t_params}
        masks = next((h for h in self.hooks if isinstance(h, SparsityStage) and h.masks is not None), None)
        if masks is not None:
            summary["cost"]["zero_weights"] = SparsityMasks.from_zeros(best, masks.masks.pattern,
                                                                       masks.ignore(self)).stats(best)
        onnx_path = self.out / "student.onnx"
        if self.cfg.export.onnx and self.cfg.export.latency_runs and onnx_path.is_file():
            latency = summary.setdefault("latency", {})
            latency["onnxruntime_cpu"] = ort_latency(onnx_path, runs=self.cfg.export.latency_runs)
            if "openvino_cpu" not in latency:  # (the stage's report measured it already when it ran)
                ov = openvino_latency(onnx_path, self.cfg.export.latency_runs)
                if ov:
                    latency["openvino_cpu"] = ov
        write_summary(self.out, summary)
        return summary


def _read_progress(out: Path) -> Dict[str, Any]:
    f = out / STAGE_FILE
    return json.loads(f.read_text()) if f.is_file() else {"done": []}


def _write_progress(out: Path, progress: Dict[str, Any]) -> None:
    tmp = out / f".{STAGE_FILE}.tmp"
    tmp.write_text(json.dumps(progress, indent=2))
    os.replace(tmp, out / STAGE_FILE)


def stage_row(s: Dict[str, Any]) -> Dict[str, Any]:
    """The per-stage entry of the top-level summary."""
    keys = ("stage", "iterations", "best_iteration", "metric", "cost", "latency", "time_s")
    row = {k: s[k] for k in keys if k in s}
    row["metrics"] = {k: v for k, v in s.get("metrics", {}).items() if k in ("before", "best")}
    if "onnx" in s:
        row["onnx"] = {"path": s["onnx"]["path"], "parity_passed": s["onnx"]["parity"]["passed"],
                       "quantize_linear": s["onnx"]["qdq"]["QuantizeLinear"]}
    return row


class StagedRun:
    """The stages of `cfg.stages` in order (see the module doc). `StagedRun(cfg).run()` -> the top-level summary;
    `stage_runs` holds the StageRun of each stage this process ran."""

    def __init__(self, cfg: RunConfig, train_loader=None, eval_fn=None):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.user_loader, self.user_eval = train_loader, eval_fn
        self.dist: Optional[D.Dist] = None
        self.stage_runs: List[StageRun] = []

    def _dist(self) -> D.Dist:
        if self.dist is None:
            self.dist = D.Dist.from_env()
        return self.dist

    def run(self, resume: bool = False, exist_ok: bool = False, force: bool = False) -> Dict[str, Any]:
        try:
            return self._run(resume, exist_ok, force)
        finally:
            self._dist().close()

    def _run(self, resume: bool, exist_ok: bool, force: bool) -> Dict[str, Any]:
        cfg, out, dist = self.cfg, self.out, self._dist()
        main = dist.is_main
        t0 = time.time()
        if resume and not (out / STAGE_FILE).is_file():
            raise ActError(f"nothing to resume in {out}: no {STAGE_FILE} (start the run without --resume)")
        runstate.prepare_output(self, resume, exist_ok, marker_name=STAGE_FILE, force=force)
        progress = _read_progress(out) if resume else {"done": []}
        if main:
            _write_progress(out, progress)
        self.stage_runs = []
        summaries: List[Dict[str, Any]] = []
        prev: Optional[Path] = None
        n = len(cfg.stages)
        for i, stage in enumerate(cfg.stages):
            d = stage_dir(out, i, stage)
            if stage.label in progress["done"] and (d / "summary.json").is_file() and (d / "best.pt").is_file():
                if main:
                    print(f"act: stage {i + 1}/{n} ({stage.label}) done; skipping")
                summaries.append(json.loads((d / "summary.json").read_text()))
                prev = d / "best.pt"
                continue
            runner = StageRun(stage_config(cfg, i, out), cfg.stages, i, prev, out / "tensorboard",
                              train_loader=self.user_loader, eval_fn=self.user_eval)
            runner.dist = dist
            self.stage_runs.append(runner)
            again = resume and (d / "last.pt").is_file()
            progress["current"] = stage.label
            if main:
                _write_progress(out, progress)
                print(f"act: stage {i + 1}/{n}: {stage.label} ({stage.type})" + (" (resuming)" if again else ""))
            try:
                # (--force: a stage may resume with a changed config too)
                s = runner.run(resume=again, exist_ok=True, force=force, close_dist=False)
            except Interrupted as e:  # SIGINT/SIGTERM: the stage saved its last.pt; resume the whole staged run
                why = "SIGTERM" if e.exit_code == 143 else "SIGINT"
                raise Interrupted(f"stopped by {why} at iteration {e.iteration}/{runner.total_iters}; {e.state} (stage "
                                  f"{i + 1}/{n}, {stage.label}). Resume with:\n  act compress --config "
                                  f"{out / 'config.yaml'} --resume", exit_code=e.exit_code) from None
            progress["done"].append(stage.label)
            prev = d / "best.pt"
            if not main:
                continue
            summaries.append(s)
            _write_progress(out, progress)
            c = s.get("cost", {})
            lat = s.get("latency", {}).get("onnxruntime_cpu", {}).get("median_ms")
            ov = (s.get("latency", {}).get("openvino_cpu") or {}).get("median_ms")
            print(f"act: stage {stage.label} done: {c.get('macs_ratio')}x MACs, {c.get('params_ratio')}x params"
                  + (f", ORT CPU {lat} ms" if lat is not None else "") + (f", OpenVINO CPU {ov} ms" if ov else "")
                  + f"; {_fmt(s['metrics']['best'])}")
        if not main:
            return {"rank": dist.rank, "stages": [s.label for s in cfg.stages]}
        return self._summarize(summaries, t0)

    def _summarize(self, summaries: List[Dict[str, Any]], t0: float) -> Dict[str, Any]:
        """The last stage's outputs copied to output_dir; the top-level summary lists every stage."""
        cfg, out = self.cfg, self.out
        n = len(cfg.stages)
        last = stage_dir(out, n - 1, cfg.stages[-1])
        for name in ("best.pt", "last.pt", "student.onnx"):
            if (last / name).is_file():
                shutil.copy2(last / name, out / f".{name}.tmp")
                os.replace(out / f".{name}.tmp", out / name)
        summary = dict(summaries[-1])
        if "onnx" in summary:
            summary["onnx"] = dict(summary["onnx"], path=str(out / "student.onnx"))
        summary["stages"] = [stage_row(s) for s in summaries]
        summary["settings"] = cfg.dump()
        summary.setdefault("time_s", {})
        summary["time_s"] = dict(summary["time_s"], total_staged=round(time.time() - t0, 2))
        write_summary(out, summary)
        print(f"act: all {n} stages done; outputs in {out} (per stage: {out / 'stages'}; TensorBoard: tensorboard "
              f"--logdir {out / 'tensorboard'})")
        return summary
