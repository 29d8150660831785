"""Staged runs: `stages:` in the config runs e.g. prune -> quant in one `act compress`, each stage distilling from the
same frozen teacher and starting from the previous stage's best student.

    stages:
      - {type: prune, target: 0.6, steps: 4, train: {iterations: 800, lr: 1.0e-4}}
      - {type: quant, train: {iterations: 300}}

Each stage is an `AutoCompression` run of its own (`StageRun`) in output_dir/stages/<n>_<name>/ (best.pt, last.pt,
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

import torch
from torch import nn

from act import quant as Q
from act.checkpoint import atomic_save, load_checkpoint
from act.compress import AutoCompression, _fmt
from act.config import RunConfig, SparsityStage, validate_config
from act.distill import FeatureCapture, channel_map, update_channel_map
from act.errors import ActError, ConfigError, Interrupted
from act.latency import ort_latency
from act.prune import (ChannelScale, PruningPlan, StructuredPruner, accumulate_grads, fold_batchnorm, has_batchnorm,
                       model_cost)
from act.sparsity import SparsityMasks

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


class StageRun(AutoCompression):
    """One stage of a staged run (see the module doc)."""

    def __init__(self, cfg: RunConfig, stages: List, index: int, start_from: Optional[Path], log_root: Path,
                 train_loader=None, eval_fn=None):
        super().__init__(cfg, train_loader=train_loader, eval_fn=eval_fn)
        self.stages, self.index, self.stage = stages, index, stages[index]
        self.start_from = start_from
        self.log_root = log_root
        self.sparsity_spec: Optional[SparsityStage] = next(
            (s for s in reversed(stages[: index + 1]) if s.type == "sparsity"), None)
        self.masks: Optional[SparsityMasks] = None
        self.prune_steps_done = 0
        self.prune_log: List[Dict[str, Any]] = []
        self.pending: Optional[Dict[str, Any]] = None  # decay_iterations: a planned step whose channels are shrinking
        self._shrink: Optional[ChannelScale] = None  # its channels, looked up once (scaled after every step)
        self._pruning = False

    def run(self, resume: bool = False, exist_ok: bool = False) -> Dict[str, Any]:
        """As AutoCompression.run, but the process group (under torchrun) stays up for the next stage."""
        t0 = time.time()
        self._prepare_output(resume, exist_ok)
        return self._run(resume, t0)

    # ---- student --------------------------------------------------------------------------------------------------
    def log_dir(self) -> Path:
        return self.log_root / f"{self.index + 1}_{self.stage.label}"

    def build_student(self) -> nn.Module:
        if self.start_from is not None:
            student = load_checkpoint(self.start_from)["model"].float()
        elif self.stage.type == "prune" and self.stage.keep_batchnorm and not self.dist.enabled:
            # the teacher's network with its BatchNorm layers (folded when the stage ends: see finish)
            student = self.family.load(self.source.path, self.source.kind).float()
        else:
            student = copy.deepcopy(self.teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        if self.stage.type == "prune":
            self.family.prepare_for_pruning(student)
        self.float_cost = model_cost(student, self.cfg.data.imgsz)
        if self.cfg.quant.enabled:
            from act.quant.placement import apply_placement

            reference = copy.deepcopy(student).eval()  # a pruned student computes what it computed in float
            Q.quantize(student, self.cfg.quant, skip=self.family.float_patterns)
            student.act_placement = apply_placement(student, self.cfg.quant, self.family, reference=reference)
        return student

    def _mask_ignore(self) -> List[str]:
        return list(self.family.float_patterns) + list(self.sparsity_spec.ignore if self.sparsity_spec else [])

    def setup(self):
        super().setup()
        self.teacher_cost = model_cost(self.teacher, self.cfg.data.imgsz)
        if self.stage.type == "prune":
            self.feature_convs()  # distill.features it could not follow through pruning: fail before any work
            sched = self.prune_schedule()
            decay = self.stage.decay_iterations
            if sched[-1] + decay >= self.total_iters:
                raise ConfigError(
                    f"invalid config:\n  stages.{self.index}.step_iterations: {self.stage.steps} pruning steps every "
                    f"{sched[1] - sched[0] if len(sched) > 1 else 0} iterations"
                    + (f", each removing its channels {decay} iterations (decay_iterations) after deciding them," if decay
                       else "") + f" need more than the stage's {self.total_iters} iterations (got step {len(sched)} "
                    f"at iteration {sched[-1]})")
            if len(sched) > 1 and decay >= sched[1] - sched[0]:
                raise ConfigError(
                    f"invalid config:\n  stages.{self.index}.decay_iterations: expected fewer than the "
                    f"{sched[1] - sched[0]} iterations between pruning steps (step_iterations), got {decay}")
        if self.sparsity_spec is not None and self.sparsity_spec is not self.stage:
            self.masks = SparsityMasks.from_zeros(self.student, self.sparsity_spec.pattern, self._mask_ignore())

    def calibrate(self, batches) -> None:
        super().calibrate(batches)
        if self.stage.type == "sparsity":
            sp = self.stage
            self.masks = SparsityMasks.compute(self.student, sp.pattern, sp.ratio, sp.scope, self._mask_ignore())
            self.masks.apply(self.student)
            print(f"act: sparsity {sp.pattern}: {self.masks.stats(self.student)}")

    # ---- pruning --------------------------------------------------------------------------------------------------
    def prune_schedule(self) -> List[int]:
        st = self.stage
        every = st.step_iterations or max(1, self.total_iters // (2 * st.steps))
        return [i * every for i in range(st.steps)]

    def before_iteration(self, it: int, batches) -> None:
        if self.stage.type != "prune":
            return
        if self.pending is not None:
            if it < self.pending["start"] + self.stage.decay_iterations:
                return
            self.apply_planned(it)
        sched = self.prune_schedule()
        k = self.prune_steps_done
        if k < len(sched) and it >= sched[k]:
            self.prune_step(k + 1, it, batches)

    def train_step(self, images: torch.Tensor) -> Dict[str, float]:
        stats = super().train_step(images)
        if self.pending is not None:  # the planned channels: linearly from their value at the plan to 0
            if self._shrink is None:
                self._shrink = ChannelScale(self.student, self.pending["plan"].removed)
            left = self.pending["start"] + self.stage.decay_iterations - self._iteration
            self._shrink(max(left - 1, 0) / max(left, 1))
        if self.masks is not None:
            self.masks.apply(self.student)
        return stats

    def prune_step(self, k: int, it: int, batches) -> None:
        """Pruning step k of the stage (1-based): prune to base * (1 - (1 - target) * k / steps) of the teacher's
        MACs (or params), then a fresh optimizer (the pruned layers hold new parameters). With decay_iterations the
        step only decides the channels now (a plan); train_step shrinks them and apply_planned removes them."""
        st = self.stage
        t0 = time.time()
        self._pruning = True
        metric = 0 if st.metric == "macs" else 1
        base = self.teacher_cost[metric]
        target = base * (1 - (1 - st.target) * k / st.steps)
        have_grads = False
        # under DDP every rank must remove the same channels: gradients and channel means are rank-averaged
        reduce = (lambda t: self.dist.sum(t) / self.dist.world_size) if self.dist.enabled else None
        if st.importance == "taylor":
            loss = accumulate_grads(self.student, lambda: self._distill_loss(next(batches)), st.taylor_batches)
            if reduce is not None:
                loss = float(reduce(torch.tensor(loss, device=self.device)))
                for prm in self.student.parameters():
                    if prm.grad is not None:
                        prm.grad = reduce(prm.grad)
            have_grads = loss > 1e-9
        pruner = StructuredPruner(self.family, st, imgsz=self.cfg.data.imgsz)
        if st.decay_iterations:
            plan = pruner.plan(self.student, target, have_grads=have_grads)
            self.student.zero_grad(set_to_none=True)
            self.s_capture.pop()
            self.t_capture.pop()
            plan.info.update(step=k, iteration=it, target=target, planned_s=round(time.time() - t0, 2))
            self.pending = {"step": k, "start": it, "plan": plan}
            self.logger.scalars("prune", {"planned_channels": plan.channels(), "step": k}, it)
            print(f"act: pruning step {k}/{st.steps} at iteration {it}: {plan.channels()} output channels (of convs "
                  f"and BatchNorms) chosen; they shrink to zero over {st.decay_iterations} iterations and go at "
                  f"iteration {it + st.decay_iterations} ({plan.info['macs'] / self.teacher_cost[0]:.3f}x MACs)")
            self._pruning = False
            return
        # for bias compensation: input means per channel (a student with BatchNorm re-centres by itself)
        images = None if has_batchnorm(self.student) else self.model_input(next(batches))
        track = self.feature_convs()
        widths = {k: v.out_channels for k, v in track.items()}
        info = pruner.prune_to(self.student, target, have_grads=have_grads, images=images, reduce=reduce, track=track)
        if track:
            update_channel_map(self.student, info.pop("removed", {}), widths)
            self.loss_fn.set_channel_maps(channel_map(self.student))
        self.s_capture.pop()
        self.t_capture.pop()
        info.update(step=k, iteration=it, target=target, time_s=round(time.time() - t0, 2))
        self._pruned(k, it, info)

    def apply_planned(self, it: int) -> None:
        """Remove the channels of the pending plan (zero by now): the end of a decaying pruning step."""
        t0 = time.time()
        self._pruning = True
        k, plan = self.pending["step"], self.pending["plan"]
        names = {m: n for n, m in self.student.named_modules()}
        track = self.feature_convs()
        widths = {n: conv.out_channels for n, conv in track.items()}
        StructuredPruner(self.family, self.stage, imgsz=self.cfg.data.imgsz).apply(self.student, plan)
        if track:
            update_channel_map(self.student, {n: plan.removed.get(names[conv], []) for n, conv in track.items()},
                               widths)
            self.loss_fn.set_channel_maps(channel_map(self.student))
        info = dict(plan.info, decayed_from=self.pending["start"], iteration=it, time_s=round(time.time() - t0, 2))
        self.pending = self._shrink = None
        self._pruned(k, it, info)

    def _pruned(self, k: int, it: int, info: Dict[str, Any]) -> None:
        """After pruning step k removed its channels at iteration `it`: log, fresh optimizer, best.pt restarts."""
        st = self.stage
        info.update(macs_ratio=info["macs"] / self.teacher_cost[0], params_ratio=info["params"] / self.teacher_cost[1])
        self.prune_log.append(info)
        self.prune_steps_done = k
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.setup_train_model()  # new parameters: DDP / compile wrap them afresh
        self.setup_optimizer()
        if it > 0:  # the schedule continues where it was
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda, last_epoch=it - 1)
        self.best_metric = self.best_iteration = None  # best.pt: only students of the final width compete
        self.logger.scalars("prune", {"macs_ratio": info["macs_ratio"], "params_ratio": info["params_ratio"],
                                      "step": k}, it)
        print(f"act: pruning step {k}/{st.steps} at iteration {it}: MACs {info['macs_ratio']:.3f}x, params "
              f"{info['params_ratio']:.3f}x of the teacher ({info['importance']} importance, {info['time_s']} s)")
        if not info["reached"]:
            print(f"act: pruning step {k}: the nearest width is {info[st.metric] / info['target']:.3f}x the step's goal "
                  f"(round_to {st.round_to} makes the {st.metric} a staircase): a smaller round_to, or close_gap: true, "
                  f"gets closer (docs/pruning.md)")
        self._pruning = False

    def feature_convs(self) -> Dict[str, nn.Module]:
        """Feature node -> the conv that produces its channels (the family knows which), whose removed output
        channels a pruning step records so the feature loss keeps matching the teacher channels that stay. (The
        student is prepared for pruning already: build_student, or the checkpoint it resumed from.)"""
        modules = dict(self.student.named_modules())
        track = {n.name: self.family.output_conv(modules[n.name]) for n in self.feature_nodes}
        untracked = {k: type(modules[k]).__name__ for k, v in track.items() if v is None}
        if untracked:
            raise ConfigError(f"invalid config:\n  distill.features: {untracked}: act cannot tell which conv produces "
                              f"these modules' channels, so a pruned student's cannot be matched to the teacher's "
                              f"(name a conv, an Ultralytics Conv, or a C2f / C3k2 / C3 / SPPF block)")
        return track

    def _distill_loss(self, images) -> torch.Tensor:
        images = self.model_input(images)
        with torch.no_grad():
            self.teacher(images)
        t_out = {k: v.clone() for k, v in self.t_capture.pop().items()}
        self.student(images)
        loss, _ = self.loss_fn(self.s_capture.pop(), t_out)
        return loss

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def state(self, iteration: int, training_state: bool = True) -> Dict[str, Any]:
        st = super().state(iteration, training_state)
        st["stage"] = {"index": self.index, "label": self.stage.label, "type": self.stage.type,
                       "prune_steps_done": self.prune_steps_done, "prune_log": self.prune_log,
                       "pending": None if self.pending is None else
                       dict(self.pending, plan=self.pending["plan"].state_dict())}
        return st

    def save(self, name: str, iteration: int, training_state: bool = True) -> Path:
        if self._pruning:  # interrupted mid-pruning: keep the last consistent last.pt (resume redoes this step)
            return self.out / name
        return super().save(name, iteration, training_state)

    def resume_from(self, path: Path, ckpt: Optional[Dict[str, Any]] = None) -> int:
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
        st = ckpt["act"].get("stage", {})
        if self.stage.type == "prune":  # the checkpoint's architecture (pruned) replaces the freshly built student
            self.s_capture.remove()
            self.student = ckpt["model"].float().to(self.device)
            for p in self.student.parameters():
                p.requires_grad_(True)
            if self.channels_last:
                self.student.to(memory_format=torch.channels_last)
            self.s_capture = FeatureCapture(self.student, self.capture_names())
            self.loss_fn.set_channel_maps(channel_map(self.student))
            self.setup_train_model()
            self.setup_optimizer()
        self.prune_steps_done = int(st.get("prune_steps_done", 0))
        self.prune_log = list(st.get("prune_log", []))
        pending = st.get("pending")
        self.pending = None if pending is None else dict(pending, plan=PruningPlan.from_state(pending["plan"]))
        self._shrink = None  # (the resumed student holds new parameters)
        it = super().resume_from(path, ckpt)
        if self.sparsity_spec is not None:
            self.masks = SparsityMasks.from_zeros(self.student, self.sparsity_spec.pattern, self._mask_ignore())
        return it

    # ---- report ---------------------------------------------------------------------------------------------------
    def finish(self, log, before, it: int, train_time: float, checkpoint: str = "best.pt",
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        extra = dict(extra or {})
        info: Dict[str, Any] = {"index": self.index, "name": self.stage.label, "type": self.stage.type}
        if self.prune_log:
            info["prune_steps"] = self.prune_log
        if self.masks is not None:
            info["sparsity"] = self.masks.stats(self.student)
        extra["stage"] = info
        if has_batchnorm(self.student):  # keep_batchnorm: what the stage hands on and exports is BN-folded
            path = self.out / checkpoint
            ckpt = load_checkpoint(path)
            fold_batchnorm(ckpt["model"])
            atomic_save(ckpt, path)
            info["batchnorm"] = "trained, folded at the end of the stage"
        summary = super().finish(log, before, it, train_time, checkpoint=checkpoint, extra=extra)
        best = load_checkpoint(self.out / checkpoint)["model"].float()
        imgsz = self.cfg.data.imgsz
        macs, params = self.float_cost if self.cfg.quant.enabled else model_cost(best, imgsz)
        t_macs, t_params = self.teacher_cost
        summary["cost"] = {"imgsz": imgsz, "macs": macs, "params": params, "gmacs": round(macs / 1e9, 4),
                           "macs_ratio": round(macs / t_macs, 4), "params_ratio": round(params / t_params, 4),
                           "teacher_macs": t_macs, "teacher_params": t_params}
        if self.masks is not None:
            summary["cost"]["zero_weights"] = SparsityMasks.from_zeros(best, self.masks.pattern,
                                                                       self._mask_ignore()).stats(best)
        onnx_path = self.out / "student.onnx"
        if self.cfg.export.onnx and self.cfg.export.latency_runs and onnx_path.is_file():
            summary["latency"] = {"onnxruntime_cpu": ort_latency(onnx_path, runs=self.cfg.export.latency_runs)}
        self._write_summary(summary)
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


def run_stages(ac: AutoCompression, resume: bool = False, exist_ok: bool = False) -> Dict[str, Any]:
    """Run the stages of `ac.cfg` in order (see the module doc); returns the top-level summary."""
    cfg, out = ac.cfg, ac.out
    dist = ac._dist()
    try:
        return _run_stages(ac, cfg, out, dist, resume, exist_ok)
    finally:
        dist.close()


def _run_stages(ac, cfg, out, dist, resume, exist_ok) -> Dict[str, Any]:
    main = dist.is_main
    t0 = time.time()
    if resume and not (out / STAGE_FILE).is_file():
        raise ActError(f"nothing to resume in {out}: no {STAGE_FILE} (start the run without --resume)")
    ac._prepare_output(resume, exist_ok, marker_name=STAGE_FILE)
    progress = _read_progress(out) if resume else {"done": []}
    if main:
        _write_progress(out, progress)
    ac.stage_runs = []
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
                          train_loader=ac.user_loader, eval_fn=ac.user_eval)
        runner.dist = dist
        runner.force = getattr(ac, "force", False)  # (--force: a stage may resume with a changed config too)
        ac.stage_runs.append(runner)
        again = resume and (d / "last.pt").is_file()
        progress["current"] = stage.label
        if main:
            _write_progress(out, progress)
            print(f"act: stage {i + 1}/{n}: {stage.label} ({stage.type})" + (" (resuming)" if again else ""))
        try:
            s = runner.run(resume=again, exist_ok=True)
        except Interrupted as e:  # SIGINT/SIGTERM: the stage saved its last.pt; resume the whole staged run
            raise Interrupted(f"{str(e).split('. Resume with')[0]} (stage {i + 1}/{n}, {stage.label}). Resume with:\n"
                              f"  act compress --config {out / 'config.yaml'} --resume", exit_code=e.exit_code) from None
        except ActError as e:
            if str(e).startswith("interrupted"):
                raise ActError(f"interrupted in stage {i + 1}/{n} ({stage.label}): {str(e).split(';')[0][12:]}; "
                               f"last.pt saved. Resume with: act compress --config {out / 'config.yaml'} --resume"
                               ) from None
            raise
        progress["done"].append(stage.label)
        prev = d / "best.pt"
        if not main:
            continue
        summaries.append(s)
        _write_progress(out, progress)
        c = s.get("cost", {})
        lat = s.get("latency", {}).get("onnxruntime_cpu", {}).get("median_ms")
        print(f"act: stage {stage.label} done: {c.get('macs_ratio')}x MACs, {c.get('params_ratio')}x params"
              + (f", ORT CPU {lat} ms" if lat is not None else "") + f"; {_fmt(s['metrics']['best'])}")
    if not main:
        return {"rank": dist.rank, "stages": [s.label for s in cfg.stages]}
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
    ac._write_summary(summary)
    print(f"act: all {n} stages done; outputs in {out} (per stage: {out / 'stages'}; TensorBoard: tensorboard "
          f"--logdir {out / 'tensorboard'})")
    return summary
