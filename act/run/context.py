"""`RunContext`: what a hook (act.run.hooks.RunHooks) may read and change of the run that calls it.

A hook gets this view, not the run: the run's state stays the run's, and what a hook may rebuild is a method with a
name (replace the student, restart training after its parameters changed), so a new run attribute never becomes an
extension API by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from act.core.config import RunConfig


class RunContext:
    def __init__(self, run):
        self._run = run

    # ---- what the run is ------------------------------------------------------------------------------------------
    @property
    def cfg(self) -> RunConfig:
        return self._run.cfg

    @cfg.setter
    def cfg(self, cfg: RunConfig) -> None:
        """Replace the config (in `configure`, before the models are built: quant.skip auto names its layers)."""
        self._run.cfg = cfg

    @property
    def family(self):
        return self._run.family

    @property
    def task(self) -> str:
        return self._run.task

    @property
    def device(self) -> torch.device:
        return self._run.device

    @property
    def out(self) -> Path:
        return self._run.out

    @property
    def source(self):
        """The teacher's source (path, kind), to load its network afresh."""
        return self._run.source

    @property
    def teacher(self) -> nn.Module:
        return self._run.teacher

    @property
    def teacher_cost(self) -> Optional[Tuple[int, int]]:
        """(MACs, params) of the teacher, where the run measured them (a stage of a staged run)."""
        return getattr(self._run, "teacher_cost", None)

    @property
    def feature_nodes(self) -> List:
        return self._run.feature_nodes

    @property
    def dist(self):
        return self._run._dist()

    @property
    def logger(self):
        return self._run.logger

    @property
    def resuming(self) -> bool:
        return bool(getattr(self._run, "resuming", False))

    # ---- where it is ----------------------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return int(getattr(self._run, "_iteration", 0))

    @property
    def total_iters(self) -> int:
        return self._run.total_iters

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self._run.history

    # ---- what it reports ------------------------------------------------------------------------------------------
    @property
    def decisions(self) -> List[Dict[str, Any]]:
        """The run's decisions (summary.json `decisions`); a hook appends to it."""
        if getattr(self._run, "decisions", None) is None:
            self._run.decisions = []
        return self._run.decisions

    def set_auto_skip(self, info: Dict[str, Any]) -> None:
        """What quant.skip auto chose (summary.json `auto_skip`)."""
        self._run.auto_skip = info

    # ---- the student and training ---------------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        return self._run.student

    def distill_loss(self, batch) -> torch.Tensor:
        """The distillation loss of the student on one batch (gradients accumulate where the caller wants them)."""
        return self._run.distill_loss(batch)

    def model_input(self, batch) -> torch.Tensor:
        return self._run.model_input(batch)

    def drop_captures(self) -> None:
        """Forget the outputs the last forward captured (after a forward that was not a training step)."""
        self._run.s_capture.pop()
        self._run.t_capture.pop()

    def update_channel_maps(self) -> None:
        """The student's channels changed (pruning): match its features to the teacher channels they were kept from."""
        from act.blocks.distill import channel_map

        self._run.loss_fn.set_channel_maps(channel_map(self._run.student))

    def replace_student(self, model: nn.Module) -> None:
        """A new student network (e.g. a pruned checkpoint's architecture): captured, matched and trained from here."""
        from act.blocks.distill import FeatureCapture

        run = self._run
        run.s_capture.remove()
        run.student = model.float().to(run.device)
        for p in run.student.parameters():
            p.requires_grad_(True)
        if run.channels_last:
            run.student.to(memory_format=torch.channels_last)
        run.s_capture = FeatureCapture(run.student, run.capture_names())
        self.update_channel_maps()
        run.setup_train_model()
        run.setup_optimizer()

    def restart_training(self, iteration: int) -> None:
        """The student's parameters were replaced in place (a pruning step): wrap and optimize them afresh, the
        learning-rate schedule continuing at `iteration`, the weight EMA and the best.pt competition starting anew."""
        run = self._run
        if run.channels_last:
            run.student.to(memory_format=torch.channels_last)
        run.setup_train_model()  # new parameters: DDP / compile wrap them afresh
        run.setup_optimizer()
        run.ema = None  # train.ema: the next step averages anew
        if iteration > 0:  # the schedule continues where it was
            run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, run.lr_factor, last_epoch=iteration - 1)
        run.best_metric = run.best_iteration = None  # best.pt: only students of the final width compete
