"""When a prune stage prunes: the step schedule beside act.blocks.prune's pruner (as torch-pruning's pruners have `step()`).

    schedule = PruneSchedule.of(stage, total_iters, index)    # checks it fits the stage (ConfigError if not)
    step = schedule.step(it, steps_done)                        # the step to take now (1-based), or None

Step k (1-based) prunes to `base * (1 - (1 - target) * k / steps)` of the teacher's MACs (or params) at iteration
`(k - 1) * every`; with `decay_iterations` a step only decides its channels (a plan) and removes them that many
iterations later, after shrinking them to zero while distillation goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from act.core.errors import ConfigError


@dataclass(frozen=True)
class PruneSchedule:
    steps: int
    every: int  # iterations between steps
    decay: int  # iterations from a step's plan to the removal of its channels (0: remove at once)
    target: float  # the stage's final share of the teacher's cost

    @classmethod
    def of(cls, stage, total_iters: int, index: int = 0) -> "PruneSchedule":
        """The schedule of a prune stage (act.core.config.PruneStage) that trains `total_iters` iterations."""
        every = stage.step_iterations or max(1, total_iters // (2 * stage.steps))
        sched = cls(stage.steps, every, stage.decay_iterations, stage.target)
        sched.check(total_iters, index)
        return sched

    @property
    def iterations(self) -> List[int]:
        """The iteration of each step."""
        return [i * self.every for i in range(self.steps)]

    def goal(self, k: int, base: float) -> float:
        """The cost that step k (1-based) prunes to, for a teacher of cost `base`."""
        return base * (1 - (1 - self.target) * k / self.steps)

    def check(self, total_iters: int, index: int = 0) -> None:
        """Fail before any work when the steps (and their decay) do not fit in the stage."""
        sched, decay = self.iterations, self.decay
        if sched[-1] + decay >= total_iters:
            raise ConfigError(
                f"invalid config:\n  stages.{index}.step_iterations: {self.steps} pruning steps every "
                f"{sched[1] - sched[0] if len(sched) > 1 else 0} iterations"
                + (f", each removing its channels {decay} iterations (decay_iterations) after deciding them," if decay
                   else "") + f" need more than the stage's {total_iters} iterations (got step {len(sched)} "
                f"at iteration {sched[-1]})")
        if len(sched) > 1 and decay >= sched[1] - sched[0]:
            raise ConfigError(
                f"invalid config:\n  stages.{index}.decay_iterations: expected fewer than the "
                f"{sched[1] - sched[0]} iterations between pruning steps (step_iterations), got {decay}")

    def step(self, it: int, steps_done: int) -> Optional[int]:
        """The step (1-based) to take at iteration `it`, after `steps_done` steps, or None."""
        sched = self.iterations
        return steps_done + 1 if steps_done < len(sched) and it >= sched[steps_done] else None

    def removal_due(self, it: int, planned_at: int) -> bool:
        """Are the channels of a plan decided at `planned_at` to be removed at iteration `it`? (Until then no new step
        is taken.)"""
        return it >= planned_at + self.decay

    def shrink_factor(self, it: int, pending_since: int) -> float:
        """After the optimizer step of iteration `it`: the factor that takes the planned channels linearly from their
        value at the plan to exactly zero at `pending_since + decay`."""
        left = pending_since + self.decay - it
        return max(left - 1, 0) / max(left, 1)
