"""`AutoCompression`: the one-line entry point of `act compress`, from an Ultralytics checkpoint to a verified Q/DQ
ONNX.

    from act import AutoCompression
    summary = AutoCompression("configs/demo_pose_qat.yaml").run()

It picks what the config asks for and runs it: `stages:` -> act.orchestrate.staged_run.StagedRun (e.g. prune -> quant); `strategy:
auto` or `ptq` -> act.orchestrate.strategy (PTQ probe, distillation QAT if needed); `strategy: qat` -> act.run.trainer.Trainer
(distillation QAT). `quant.skip: auto` plugs in as a hook (act.orchestrate.analyze.AutoSkip). A script may pass its own
`train_loader` (image batches, float in [0, 1], or (images, ...) tuples) and `eval_fn(model, context) -> dict`.
After `run()`, `trainer` is the Trainer that ran (strategy qat: its student, teacher, history, loss_history) and
`stage_runs` the stages of a staged run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from act.orchestrate.analyze import AutoSkip
from act.core.config import RunConfig
from act.run.runner import as_config
from act.orchestrate.staged_run import StagedRun, StageRun
from act.orchestrate.strategy import run_strategy
from act.run.trainer import Trainer


class AutoCompression:
    """One `act compress` run. `run()` trains (or resumes), evaluates, exports and returns the summary dict."""

    def __init__(self, config: Union[RunConfig, str, Path, Dict], overrides: Optional[List[str]] = None,
                 train_loader: Optional[Iterable] = None, eval_fn: Optional[Callable] = None):
        self.cfg = as_config(config, overrides)
        self.out = Path(self.cfg.output_dir)
        self.user_loader, self.user_eval = train_loader, eval_fn
        self.trainer: Optional[Trainer] = None
        self.stage_runs: List[StageRun] = []
        if not self.cfg.stages and self.cfg.strategy == "qat":
            self.trainer = Trainer(self.cfg, train_loader=train_loader, eval_fn=eval_fn, hooks=[AutoSkip()])

    def run(self, resume: bool = False, exist_ok: bool = False, force: bool = False) -> Dict[str, Any]:
        if self.cfg.strategy == "auto" and self.cfg.auto.budget:  # stages, if any, make the frontier's pruned points
            return run_strategy(self.cfg, resume=resume, exist_ok=exist_ok, train_loader=self.user_loader,
                                eval_fn=self.user_eval)
        if self.cfg.stages:
            staged = StagedRun(self.cfg, train_loader=self.user_loader, eval_fn=self.user_eval)
            self.stage_runs = staged.stage_runs
            try:
                return staged.run(resume=resume, exist_ok=exist_ok, force=force)
            finally:
                self.stage_runs = staged.stage_runs
        if self.trainer is None:  # strategy auto (PTQ probe, QAT if needed) or ptq
            return run_strategy(self.cfg, resume=resume, exist_ok=exist_ok, train_loader=self.user_loader,
                                eval_fn=self.user_eval)
        return self.trainer.run(resume=resume, exist_ok=exist_ok, force=force)

    def __getattr__(self, name: str):
        """The Trainer's state (student, teacher, nodes, history, loss_history, ...) for strategy qat runs."""
        trainer = self.__dict__.get("trainer")
        if trainer is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(trainer, name)
