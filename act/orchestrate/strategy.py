"""`strategy: auto` (the default of `act compress`): the cheapest compression that meets the target.

1. (`quant.skip: auto`) sensitivity analysis picks the layers that stay in float (act.orchestrate.analyze).
2. PTQ probe: the activation histograms are collected once, then every calibrator of `auto.search` (e.g. percentile
   99.99 / 99.999, mse, entropy) is applied and evaluated (label-free fidelity, and mAP with eval.data). The best by
   the target metric (ties: head SNR) is kept.
3. If it meets `auto.target`, the run stops: ptq.pt, the Q/DQ ONNX, summary, report (minutes).
4. Otherwise distillation QAT starts from that PTQ state (quant.init_from) and stops early at the first eval where
   `auto.qat_target` (default: `auto.target`) is met.
5. A speed/size target (`auto.prune: {macs_ratio: 0.6}` or `params_ratio`) turns the run into the staged pipeline
   prune (to the target) -> quant (distillation QAT) of act.orchestrate.staged_run; the decision is logged like the others.
6. A budget (`auto.latency_ms` / `auto.macs_ratio`, with `auto.max_drop`) measures the accuracy-latency frontier and
   delivers its most accurate point within the budget (act.orchestrate.budget), or fails naming the closest points.

Every decision is printed (`act: decision: ...`), kept in summary.json["decisions"] and shown in the report.
`strategy: ptq` runs `act ptq`; `strategy: qat` runs distillation QAT (act.run.trainer) only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from act.orchestrate.analyze import AutoSkip
from act.run.initial_ranges import calibration_loader, fidelity_score, label as _label, search
from act.core.config import RunConfig
from act.core.errors import ConfigError
from act.run.hooks import RunHooks
from act.blocks.monitor import RunLogger
from act.run.ptq import PostTrainingQuantization
from act.run.runner import fmt_metrics as _fmt
from act.orchestrate.staged_run import StagedRun
from act.run.trainer import Trainer
from act.core.targets import check_target, target_metric

PRUNE_MODULE = "act.blocks.prune"


def pruning_available() -> bool:
    try:
        return importlib.util.find_spec(PRUNE_MODULE) is not None
    except (ImportError, ValueError):
        return False


def _decide(decisions: List[Dict[str, Any]], stage: str, decision: str, **numbers) -> None:
    entry = {"stage": stage, "decision": decision, **numbers}
    decisions.append(entry)
    why = numbers.get("why")
    print(f"act: decision [{stage}]: {decision}" + (f" ({why})" if why else ""))


class PTQProbe(PostTrainingQuantization):
    """The PTQ stage of `auto`: one histogram pass, a small search over calibrators, the best kept."""

    def __init__(self, config: RunConfig, decisions: List[Dict[str, Any]], eval_fn: Optional[Callable] = None):
        super().__init__(config, eval_fn=eval_fn, hooks=[AutoSkip()])
        self.decisions = decisions
        self.accepted = False
        self.candidates: List[Dict[str, Any]] = []

    def run(self, resume: bool = False, exist_ok: bool = False) -> Optional[Dict[str, Any]]:
        cfg = self.cfg
        t0 = time.time()
        self.prepare_output(False, exist_ok, marker_name=self.CHECKPOINT)
        self.setup()
        self.best_iteration = 0
        log = RunLogger(self.out / "tensorboard")
        if not self.evaluators:
            raise ConfigError("invalid config:\n  strategy: auto needs an evaluation to decide with: keep "
                              "eval.fidelity.enabled: true (label-free) or set eval.data")
        before: Dict[str, Dict[str, float]] = {"teacher": self.evaluate(self.teacher, 0)}
        if before["teacher"]:
            log.scalars("eval_before/teacher", before["teacher"], 0)
            print(f"act: teacher {_fmt(before['teacher'])}")
        self.teacher_eval = before["teacher"]
        self.history.append({"iteration": 0, "before": before})

        # one pass of histograms for every candidate calibrator
        loader = calibration_loader(self, cfg.auto.probe_images or cfg.ptq.num_images)
        t_cal = time.time()
        target = cfg.auto.target
        metric = target_metric(target, self.task)
        print(f"act: PTQ probe: {len(cfg.auto.search)} calibrators on {len(loader.dataset)} images, target "
              f"{metric}")

        def tried(i: int, t) -> None:
            _, info = check_target(target, t.metrics, self.teacher_eval, self.task, where="auto.target")
            slim = {k: v for k, v in t.metrics.items() if "/" not in k}
            self.candidates.append({"calibrator": t.label, **info, "snr_db": t.metrics.get("fidelity_snr_db_mean",
                                                                                           -math.inf),
                                    "metrics": slim})
            log.scalars(f"probe/{t.label.replace(' ', '_')}", slim, i)
            print(f"act: PTQ probe {t.label}: {_fmt(t.metrics)}")

        best, _ = search(self, loader, cfg.auto.search, fidelity_score(metric), on_result=tried)
        calibrate_time = time.time() - t_cal
        cand, result, res = best.candidate, best.result, best.metrics
        _, info = check_target(target, res, self.teacher_eval, self.task, where="auto.target")
        self.best_calibrator = cand
        self.best_eval = res
        self.history.append({"iteration": 0, "eval": res})
        if self.metric:
            self.best_metric = res.get(self.metric)
        log.quantizers(self.student, 0)
        self.save(self.CHECKPOINT, 0, training_state=False)
        table = {c["calibrator"]: round(c["value"], 4) for c in self.candidates}
        _decide(self.decisions, "ptq", f"best calibrator: {_label(cand)}", metric=info["metric"],
                value=info["value"], candidates=table, why=f"highest {info['metric']} of {len(table)} candidates")
        self.accepted = info["met"]
        if self.accepted:
            _decide(self.decisions, "ptq", "stop after PTQ", metric=info["metric"], value=info["value"],
                    threshold=info["threshold"],
                    why=f"{info['metric']} {info['value']:.4f} >= target {info['threshold']:.4f}")
        else:
            _decide(self.decisions, "ptq", "go on to distillation QAT", metric=info["metric"], value=info["value"],
                    threshold=info["threshold"],
                    why=f"{info['metric']} {info['value']:.4f} < target {info['threshold']:.4f}")
        self.probe_time = time.time() - t0
        if not self.accepted:
            log.close()
            return None
        extra = {
            "mode": "ptq",
            "strategy": {"name": "auto", "stage": "ptq", "target": _target_json(cfg.auto.target, self.task),
                         "probe": self.candidates},
            "ptq": {"calibrator": cand.calibrator, "percentile": cand.percentile if cand.calibrator == "percentile"
                    else None, "images": len(loader.dataset), "bins": cfg.ptq.bins, **result.summary()},
            "time_s": {"calibrate": round(calibrate_time, 2), "compress": round(self.probe_time, 2),
                       "eval": round(self.eval_time, 2)},
        }
        summary = self.finish(log, before, 0, time.time() - t0, checkpoint=self.CHECKPOINT, extra=extra)
        log.close()
        return summary


class QATTarget(RunHooks):
    """Distillation QAT that stops at the first eval where the target is met, and says so in the decisions."""

    def __init__(self, target, teacher_eval: Dict[str, float], decisions: List[Dict[str, Any]],
                 info: Dict[str, Any]):
        self.target, self.teacher_eval, self.decisions, self.info = target, teacher_eval, decisions, info
        self.stopped_early: Optional[int] = None

    def should_stop(self, run, results: Dict[str, float], iteration: int) -> bool:
        if self.target is None or not results:
            return False
        met, info = check_target(self.target, results, self.teacher_eval, run.task, where="auto.qat_target")
        if met:
            _decide(self.decisions, "qat", f"stop early at iteration {iteration}/{run.total_iters}",
                    iteration=iteration, metric=info["metric"], value=info["value"], threshold=info["threshold"],
                    why=f"{info['metric']} {info['value']:.4f} >= target {info['threshold']:.4f}")
            self.stopped_early = iteration
        return met

    def before_delivery(self, run, checkpoint: str, extra: Dict[str, Any]) -> None:
        if self.target is not None and not self.stopped_early:
            evals = [h["eval"] for h in run.history if h.get("eval")]
            last = None
            if evals:
                _, last = check_target(self.target, evals[-1], self.teacher_eval, run.task, where="auto.qat_target")
            _decide(self.decisions, "qat", f"trained all {run.total_iters} iterations; target not met",
                    **({"metric": last["metric"], "value": last["value"], "threshold": last["threshold"],
                        "why": f"last {last['metric']} {last['value']:.4f} < target {last['threshold']:.4f}"}
                       if last else {"why": "no evaluation ran"}))
        extra["mode"] = "qat"
        extra["strategy"] = {**self.info, "stopped_early_at": self.stopped_early}
        _save_decisions(run.out, self.decisions)


def _targeted_trainer(cfg: RunConfig, target, teacher_eval: Dict[str, float], decisions: List[Dict[str, Any]],
                      info: Dict[str, Any], train_loader: Optional[Iterable] = None,
                      eval_fn: Optional[Callable] = None) -> Trainer:
    runner = Trainer(cfg, train_loader=train_loader, eval_fn=eval_fn,
                     hooks=[QATTarget(target, teacher_eval, decisions, info)])
    runner.decisions = decisions
    return runner


def _save_decisions(out: Path, decisions) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decisions.json").write_text(json.dumps(decisions, indent=2, default=str))


def _target_json(target, task: str) -> Dict[str, Any]:
    return {"metric": target_metric(target, task), "min": target.min, "max_drop": target.max_drop}


class AutoStrategy:
    """strategy: auto. A script's `train_loader` feeds the QAT stage (and the stages of auto.prune), its `eval_fn`
    every evaluation, the probe's too; calibration reads the pool (data.train), as `act ptq` does."""

    def __init__(self, config: RunConfig, train_loader: Optional[Iterable] = None,
                 eval_fn: Optional[Callable] = None):
        self.cfg = config
        self.out = Path(config.output_dir)
        self.decisions: List[Dict[str, Any]] = []
        self.user_loader, self.user_eval = train_loader, eval_fn

    def check(self) -> None:
        if self.cfg.auto.prune is not None and not pruning_available():
            raise ConfigError("invalid config:\n  auto.prune: a speed/size target needs act's pruning stage, "
                              "which this act installation does not have; remove auto.prune (quantization only)")
        if not self.cfg.quant.enabled:
            raise ConfigError("invalid config:\n  quant.enabled: false, but strategy auto quantizes (use strategy: "
                              "qat for distillation without quantization)")

    def run(self, resume: bool = False, exist_ok: bool = False) -> Dict[str, Any]:
        self.check()
        t0 = time.time()
        if self.cfg.auto.budget:
            from act.orchestrate.budget import BudgetStrategy

            return BudgetStrategy(self.cfg, self.user_loader, self.user_eval).run(resume=resume, exist_ok=exist_ok)
        if self.cfg.auto.prune is not None:
            return self._prune_then_quantize(resume=resume, exist_ok=exist_ok)
        if resume and (self.out / "last.pt").is_file():
            return self._resume_qat()
        probe = PTQProbe(self.cfg, self.decisions, eval_fn=self.user_eval)
        summary = probe.run(exist_ok=exist_ok)
        _save_decisions(self.out, self.decisions)
        if probe.accepted:
            return summary
        return self._qat(probe, resume=False, t0=t0)

    def _prune_then_quantize(self, resume: bool, exist_ok: bool) -> Dict[str, Any]:
        """A speed/size target: PTQ alone cannot make the network smaller, so the run becomes the staged pipeline
        prune (to the target, distilling between steps) -> quant (distillation QAT), with the config's own train,
        distill, quant and eval settings for both stages."""
        p = self.cfg.auto.prune
        metric, target = ("macs", p.macs_ratio) if p.macs_ratio is not None else ("params", p.params_ratio)
        stages: List[Dict[str, Any]] = [{"type": "quant"}]
        if target < 1.0:
            stages.insert(0, {"type": "prune", "target": target, "metric": metric})
            _decide(self.decisions, "auto", f"prune to {target}x the teacher's {metric.upper()}, then distillation QAT",
                    why=f"auto.prune asks for {metric} <= {target}x; PTQ cannot change the network's size",
                    target=target, metric=metric)
        else:
            _decide(self.decisions, "auto", "no pruning: the target is the teacher's own size; distillation QAT",
                    why=f"auto.prune {metric}_ratio = {target}", target=target, metric=metric)
        raw = {**self.cfg.dump(), "strategy": "qat", "stages": stages}
        raw["auto"] = {**raw.get("auto", {}), "prune": None}
        staged = RunConfig.model_validate(raw)
        summary = StagedRun(staged, train_loader=self.user_loader, eval_fn=self.user_eval).run(resume=resume,
                                                                                               exist_ok=exist_ok)
        summary["decisions"] = list(self.decisions) + list(summary.get("decisions") or [])
        _save_decisions(self.out, summary["decisions"])
        return summary

    def _resume_qat(self) -> Dict[str, Any]:
        """The QAT stage was interrupted: continue it with the config it wrote (strategy qat, the PTQ init, the
        chosen float layers) and the decisions taken so far."""
        from act.blocks.checkpoint import load_checkpoint
        from act.core.config import load_config

        print(f"act: strategy auto: resuming the QAT stage in {self.out}")
        qcfg = load_config(self.out / "config.yaml")
        state = load_checkpoint(self.out / "last.pt")["act"]
        dec = self.out / "decisions.json"
        self.decisions = json.loads(dec.read_text()) if dec.is_file() else []
        hist = state.get("history") or [{}]
        runner = _targeted_trainer(qcfg, self.cfg.auto.qat_target or self.cfg.auto.target,
                                   hist[0].get("before", {}).get("teacher", {}), self.decisions,
                                   {"name": "auto", "stage": "qat", "resumed": True}, self.user_loader, self.user_eval)
        return runner.run(resume=True, exist_ok=True)

    def _qat(self, probe: PTQProbe, resume: bool, t0: Optional[float] = None) -> Dict[str, Any]:
        cfg = self.cfg
        qat_target = cfg.auto.qat_target or cfg.auto.target
        quant = cfg.quant.model_copy(update={"init_from": str(self.out / PTQProbe.CHECKPOINT),
                                             "skip": probe.cfg.quant.skip})
        evalc = cfg.eval
        task = probe.task
        if evalc.metric is None:  # best.pt: the best by the target's metric
            evalc = evalc.model_copy(update={"metric": target_metric(qat_target, task)})
        qcfg = RunConfig.model_validate({**cfg.dump(), "strategy": "qat", "quant": quant.model_dump(mode="json"),
                                         "eval": evalc.model_dump(mode="json")})
        # the target's metric must exist in the evaluations QAT runs (same evaluators as the probe)
        check_target(qat_target, probe.best_eval, probe.teacher_eval, probe.task, where="auto.qat_target")
        runner = _targeted_trainer(qcfg, qat_target, probe.teacher_eval, self.decisions, {
            "name": "auto", "stage": "qat", "target": _target_json(cfg.auto.target, task),
            "qat_target": _target_json(qat_target, task), "probe": probe.candidates,
            "probe_calibrator": _label(probe.best_calibrator), "probe_time_s": round(probe.probe_time, 2),
        }, self.user_loader, self.user_eval)
        runner.known_before = {"teacher": probe.teacher_eval, "student_init": probe.best_eval}
        runner.auto_skip = probe.auto_skip
        summary = runner.run(resume=resume, exist_ok=True)
        return summary


def run_strategy(cfg: RunConfig, resume: bool = False, exist_ok: bool = False, train_loader: Optional[Iterable] = None,
                 eval_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """The run `cfg.strategy` names, with a script's own `train_loader` / `eval_fn` where it trains / evaluates."""
    from act.blocks import dist as D

    if cfg.strategy != "qat" and D.env_world() > 1:
        raise ConfigError(f"invalid config:\n  strategy: {cfg.strategy!r} runs in one process; data-parallel "
                          f"(--devices) is for strategy: qat")
    if cfg.strategy == "ptq":
        return PostTrainingQuantization(cfg, eval_fn=eval_fn, hooks=[AutoSkip()]).run(exist_ok=exist_ok)
    if cfg.strategy == "qat":
        return Trainer(cfg, train_loader=train_loader, eval_fn=eval_fn, hooks=[AutoSkip()]).run(resume=resume,
                                                                                                exist_ok=exist_ok)
    return AutoStrategy(cfg, train_loader, eval_fn).run(resume=resume, exist_ok=exist_ok)
