"""`Run`: what every kind of run shares, trained or not (the QAT trainer, PTQ, a stage of a staged run).

A run has a validated config and an output folder; it builds the device, the frozen teacher and the fake-quantized
student (act.run.build), the distillation nodes and their capture hooks, the held-out fidelity slice and the evaluators;
it evaluates, writes checkpoints (act.run.runstate) and delivers (act.run.deliver: summary, ONNX, parity, lint, report).
What happens in between is the subclass's: act.run.trainer.Trainer distills, act.run.ptq.PostTrainingQuantization calibrates.
Extension points are `RunHooks` (act.run.hooks) in `run.hooks`.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from act.blocks import dist as D
from act.blocks import quant as Q
from act.run import runstate
from act.run.build import build_student, load_teacher, seed_everything, select_device
from act.core.config import RunConfig, load_config, validate_config
from act.blocks.data import resolve_source, split_holdout
from act.blocks.distill import DistillLoss, FeatureCapture, channel_map, find_feature_nodes, find_nodes
from act.core.errors import ActError, ConfigError, ResourceError
from act.blocks.evaluate import CocoEvaluator, EvalContext, default_metric, load_callback
from act.blocks.fidelity import FidelityEvaluator
from act.run.build import check_inputs
from act.run.context import RunContext
from act.run.hooks import RunHooks


def as_config(config: Union[RunConfig, str, Path, Dict], overrides: Optional[List[str]] = None) -> RunConfig:
    """A RunConfig from a RunConfig, a dict or a yaml path, with `key=value` overrides; the files and packages it
    names are checked (before any work)."""
    if isinstance(config, RunConfig):
        if overrides is None:
            return validate_config(config.dump())
        cfg = load_config(raw=config.dump(), overrides=overrides)
    elif isinstance(config, dict):
        cfg = load_config(raw=config, overrides=overrides)
    else:
        cfg = load_config(config, overrides)
    check_inputs(cfg)
    return cfg


def fmt_metrics(d: Dict[str, float]) -> str:
    """The headline metrics; the per-node details (keys with a '/') go to TensorBoard and summary.json only."""
    return ", ".join(f"{k}={v:.4f}" for k, v in d.items() if "/" not in k) or "(no metrics)"


class Run:
    """Shared setup, evaluation, checkpoints and delivery of one run in `cfg.output_dir`."""

    CHECKPOINT = "best.pt"  # what the run delivers (PTQ: ptq.pt)

    def __init__(self, config: Union[RunConfig, str, Path, Dict], overrides: Optional[List[str]] = None,
                 train_loader: Optional[Iterable] = None, eval_fn: Optional[Callable] = None,
                 hooks: Sequence[RunHooks] = ()):
        self.cfg = as_config(config, overrides)
        self.user_loader = train_loader
        self.user_eval = eval_fn
        self.hooks: List[RunHooks] = list(hooks)
        self.context = RunContext(self)  # what the hooks see of this run
        self.out = Path(self.cfg.output_dir)
        self.dist: Optional[D.Dist] = None
        self.resuming = False
        self.force = False
        self.best_metric: Optional[float] = None
        self.best_iteration: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        self.bad_images: List[str] = []
        self.nonfinite_steps = 0
        self.eval_time = 0.0
        self.decisions: Optional[List[Dict[str, Any]]] = None  # what act decided and why (strategy, auto skip)
        self.auto_skip: Optional[Dict[str, Any]] = None
        self.known_before: Optional[Dict[str, Dict[str, float]]] = None  # 'before' metrics an earlier run measured
        self._where = "training"

    # ---- setup ------------------------------------------------------------------------------------------------------
    def _dist(self) -> D.Dist:
        if self.dist is None:
            self.dist = D.Dist.from_env()
        return self.dist

    def setup_device(self) -> None:
        cfg = self.cfg
        self.dist = self._dist()
        self.device = self.dist.device(cfg.train.device) if self.dist.enabled else select_device(cfg.train.device)
        self.dist.init(self.device)
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.train.seed)
        for h in self.hooks:
            cfg = self.cfg
            h.configure(self.context)
            if self.cfg is not cfg:  # (a hook that changed the config used the random state: start it again)
                seed_everything(self.cfg.train.seed)

    def setup_models(self) -> None:
        """Device; teacher (frozen); student; distillation nodes, loss and capture hooks, on the device."""
        self.setup_device()
        cfg = self.cfg
        self.teacher, self.family, self.source = load_teacher(cfg)
        self.task = self.family.task(self.teacher)
        self.student = self.build_student()
        self.nodes = find_nodes(self.teacher, self.family, cfg.distill.nodes)
        self.feature_nodes = find_feature_nodes(self.teacher, self.family, cfg.distill.features)
        kpt = self.family.keypoint_shape(self.teacher)  # (nk, ndim) of a pose model, else ()
        pseudo = cfg.distill.pseudo_labels
        self.loss_fn = DistillLoss(self.nodes + self.feature_nodes, cfg.distill,
                                   reg_max=self.family.dfl_bins(self.teacher),
                                   oks_sigmas=self.family.oks_sigmas(kpt[0]) if kpt else None,
                                   kpt_ndim=kpt[1] if len(kpt) > 1 else 3,
                                   pseudo_labels=self.family.pseudo_label_loss(self.teacher, self.nodes, pseudo)
                                   if pseudo.enabled else None)
        self.loss_fn.set_channel_maps(channel_map(self.student))
        self.teacher.to(self.device)
        self.student.to(self.device)
        self.channels_last = cfg.train.channels_last in (True, "auto") and self.device.type == "cuda"
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        names = self.capture_names()
        self.t_capture = FeatureCapture(self.teacher, names)
        self.s_capture = FeatureCapture(self.student, names)
        if self.dist.enabled:
            for q in Q.activation_quantizers(self.student).values():
                q.reduce_fn = D.all_reduce_max  # identical moving averages on every rank

    def build_student(self) -> nn.Module:
        """The student before training: a hook's network (a stage's start), else a copy of the teacher; quantized."""
        base = next((m for m in (h.build_student(self.context) for h in self.hooks) if m is not None), None)
        return build_student(self.teacher, self.cfg, self.family, base=base)

    def capture_names(self) -> List[str]:
        """Modules whose outputs the loss reads: the distillation nodes, then the feature nodes."""
        return [n.name for n in self.nodes + self.feature_nodes]

    def setup_pool(self) -> None:
        """The unlabeled pool, less the held-out fidelity slice (its last eval.fidelity.images images)."""
        cfg = self.cfg
        fid = cfg.eval.fidelity
        self.fidelity_paths: List[Path] = []
        self.fidelity_held_out = True
        if fid.enabled and fid.source:
            self.pool = None
            self.fidelity_paths = resolve_source(fid.source)[: fid.images]
        elif fid.enabled:
            self.pool, self.fidelity_paths, self.fidelity_held_out = split_holdout(resolve_source(cfg.data.train),
                                                                                    fid.images)
        else:
            self.pool = None  # the loader resolves data.train itself

    def setup_eval(self, keeps_best: bool = False) -> None:
        """The evaluators (rank 0) and eval.metric; `keeps_best`: the run keeps best.pt by that metric, so something
        must evaluate (checked on every rank, before any work)."""
        cfg = self.cfg
        imgsz = cfg.eval.imgsz or cfg.data.imgsz
        self.evaluators: List[Callable] = []
        self.metric = cfg.eval.metric or (default_metric(self.task, self.family) if cfg.eval.data else None)
        evaluates = cfg.eval.data or cfg.eval.callback or self.user_eval is not None or (
            cfg.eval.fidelity.enabled and self.fidelity_paths)
        if keeps_best and self.metric and not evaluates:  # best.pt would never be written
            raise ConfigError(f"invalid config:\n  eval.metric: {self.metric!r} picks best.pt, but nothing is "
                              "evaluated (no eval.data, eval.fidelity off, no eval.callback): set eval.metric=null "
                              "to keep the last student, or turn an evaluation on")
        if not self._dist().is_main:  # rank 0 evaluates; the others wait at a barrier
            self.eval_on = self.dist.broadcast(None)
            return
        if cfg.eval.data:
            self.evaluators.append(CocoEvaluator(cfg.eval.data, self.task, imgsz,
                                                 cfg.eval.batch_size, cfg.eval.max_images, cfg.eval.split,
                                                 workdir=self.out / "eval", family=self.family))
        if cfg.eval.fidelity.enabled and self.fidelity_paths:
            fid = cfg.eval.fidelity
            self.evaluators.append(FidelityEvaluator.from_paths(
                self.teacher, self.fidelity_paths, imgsz, self.task, nodes=self.nodes,
                batch_size=fid.batch_size or cfg.eval.batch_size, teacher_conf=fid.teacher_conf,
                held_out=self.fidelity_held_out, family=self.family))
        if cfg.eval.callback:
            self.evaluators.append(load_callback(cfg.eval.callback))
        if self.user_eval is not None:
            self.evaluators.append(self.user_eval)
        self.eval_on = self.dist.broadcast(bool(self.evaluators))

    # ---- evaluation -------------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, iteration: int) -> Dict[str, float]:
        if not self.evaluators:
            return {}
        t0 = time.time()
        self._where = "eval"
        ctx = EvalContext(self.device, self.cfg.eval.imgsz or self.cfg.data.imgsz, iteration, self.out)
        was = model.training
        model.eval()
        results: Dict[str, float] = {}
        try:
            for fn in self.evaluators:
                r = fn(model, ctx)
                if not isinstance(r, dict):
                    raise ActError(f"eval callback {fn} returned {type(r).__name__}, expected a dict of floats")
                results.update({k: float(v) for k, v in r.items()})
        finally:
            model.train(was)
            self.eval_time += time.time() - t0
            self._where = "training"
        if self.metric and self.metric not in results and model is not self.teacher:
            # (the teacher has no label-free fidelity against itself, so it may lack the metric)
            raise ConfigError(f"invalid config:\n  eval.metric: {self.metric!r} is not among the eval results "
                              f"{sorted(results)}")
        return results

    # ---- checkpoints and output folder ------------------------------------------------------------------------------
    def state(self, iteration: int, training_state: bool = True) -> Dict[str, Any]:
        return runstate.run_state(self, iteration, training_state)

    def save(self, name: str, iteration: int, training_state: bool = True, model: Optional[nn.Module] = None) -> Path:
        """last.pt carries the optimizer/scheduler for --resume; best.pt only the student (or `model`, e.g. its
        weight EMA) and its metrics."""
        path = self.out / name
        if not self._dist().is_main or any(h.saving_paused() for h in self.hooks):
            return path  # (mid-pruning: the last consistent last.pt stays; resume redoes the step)
        return runstate.save_checkpoint(self, path, self.state(iteration, training_state), model=model)

    def prepare_output(self, resume: bool, exist_ok: bool, marker_name: str = "last.pt") -> None:
        self._resume_ckpt = runstate.prepare_output(self, resume, exist_ok, marker_name, self.force)

    def log_dir(self) -> Path:
        return self.out / "tensorboard"

    def resume_command(self) -> str:
        return f"act compress --config {shlex.quote(str(self.out / 'config.yaml'))} --resume"

    def oom_error(self, e: BaseException, where: str) -> ResourceError:
        bs = self.cfg.eval.batch_size if where == "eval" else self.cfg.data.batch_size
        key = "eval.batch_size" if where == "eval" else "data.batch_size"
        half = max(1, bs // 2)
        how = (f"Try {key}={half}" if bs > 1 else f"Try a smaller data.imgsz (now {self.cfg.data.imgsz})")
        return ResourceError(
            f"CUDA out of memory during {where} at {key}={bs}, imgsz {self.cfg.data.imgsz} on {self.device}. {how}; "
            f"continue from the last checkpoint with: {self.resume_command()} --force {key}={half}")

    # ---- delivery ---------------------------------------------------------------------------------------------------
    def finish(self, log, before, it: int, train_time: float, checkpoint: Optional[str] = None,
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Summary, Q/DQ ONNX of `checkpoint`, parity, lint, engine, report (act.run.deliver); writes summary.json."""
        from act.run.deliver import deliver, write_summary

        checkpoint = checkpoint or self.CHECKPOINT
        extra = dict(extra or {})
        for h in self.hooks:
            h.before_delivery(self.context, checkpoint, extra)
        summary = deliver(self, log, before, it, train_time, checkpoint, extra)
        if self.hooks:
            for h in self.hooks:
                h.delivered(self.context, summary, checkpoint)
            write_summary(self.out, summary)
        return summary
