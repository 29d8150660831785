"""Extension points of a run. A stage kind (act.orchestrate.stage_kinds), the strategy's target (act.orchestrate.strategy) and
`quant.skip: auto` (act.orchestrate.analyze) are `RunHooks` that a run calls at fixed points; the run itself knows none of them.

Every method does nothing by default; override the ones a behaviour needs. `run` is an act.run.context.RunContext:
the calling run's config, models and position, and the named operations a hook may perform on it (replace the
student, restart training after a pruning step), not the run object itself.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn


class RunHooks:
    # ---- building ---------------------------------------------------------------------------------------------------
    def configure(self, run) -> None:
        """Before the models are built; may replace run.cfg (quant.skip: auto resolves the layer names here)."""

    def build_student(self, run) -> Optional[nn.Module]:
        """The student's float network before quantization, if this hook decides it (the first one that returns a
        module wins; default: a deep copy of the teacher)."""
        return None

    def setup(self, run) -> None:
        """After the models, data, evaluation and optimizer are set up: check what only now can be checked."""

    # ---- training ---------------------------------------------------------------------------------------------------
    def calibrated(self, run) -> None:
        """After the activation ranges are initialised (a fresh run only)."""

    def before_iteration(self, run, iteration: int, batches) -> None:
        """Before each training iteration (a prune stage prunes here)."""

    def after_step(self, run) -> None:
        """After each optimizer step (masks and shrinking channels are re-applied here)."""

    def should_stop(self, run, results: Dict[str, float], iteration: int) -> bool:
        """After an evaluation: stop training here? (the strategy's target)"""
        return False

    def saving_paused(self) -> bool:
        """True while the student is inconsistent (mid-pruning): checkpoints keep the last consistent state."""
        return False

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Entries merged into the checkpoint's act state."""
        return {}

    def resume(self, run, ckpt: Dict[str, Any]) -> None:
        """Before the run restores itself from `ckpt` (a hook may replace the student with the checkpoint's)."""

    def resumed(self, run, ckpt: Dict[str, Any]) -> None:
        """After the run restored itself from `ckpt`."""

    # ---- delivery ---------------------------------------------------------------------------------------------------
    def before_delivery(self, run, checkpoint: str, extra: Dict[str, Any]) -> None:
        """Before the summary, export and report: add to `extra` (merged into summary.json) or fix up the checkpoint
        that is delivered."""

    def delivered(self, run, summary: Dict[str, Any], checkpoint: str) -> None:
        """After delivery: add to the summary (rewritten afterwards)."""
