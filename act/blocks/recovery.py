"""Non-finite losses and gradients: skip, restore, lower the learning rate, or stop (train.nan_policy).

Each step whose loss or gradient holds a NaN/Inf is skipped (no optimizer or scheduler step) and counted, and the
quantizer statistics that step's forward pass updated are put back. After `max_consecutive` skipped steps in a row
the student and optimizer go back to the last good state (an in-memory snapshot taken at every checkpoint) and every
learning rate is multiplied by `lr_factor`. When a further restore would exceed `max_restores`, or the run has
skipped more than `max_skipped` steps in total, training stops with DivergedError (exit 4); best.pt is kept.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from act.core.errors import DivergedError


def _to_cpu(obj):
    """A deep copy of a (nested) state dict with every tensor copied to the host."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class NanGuard:
    """Bookkeeping and actions of the NaN/Inf policy for one training run."""

    def __init__(self, policy, owner):
        """owner: the run (its .student, .optimizer and .scheduler are looked up at each use: a prune stage
        replaces them mid-run)."""
        self.policy = policy
        self.owner = owner
        self.skipped = 0          # non-finite steps skipped in total
        self.consecutive = 0      # ... in a row, up to now
        self.restores = 0         # times the last good state was restored
        self.lr_scale = 1.0       # product of the lr_factor of every restore
        self.events: List[Dict[str, Any]] = []
        # floating/bool buffers of the model (quantizer running ranges, flags): saved before each step, put back
        # when the step is skipped or cut short
        self._buffers: List[torch.Tensor] = []
        self._before: List[torch.Tensor] = []
        self._buffers_of = None
        self._good: Optional[Dict[str, Any]] = None

    @property
    def model(self) -> nn.Module:
        return self.owner.student

    @property
    def optimizer(self):
        return self.owner.optimizer

    @property
    def scheduler(self):
        return self.owner.scheduler

    def _track_buffers(self) -> None:
        bufs = [b for b in self.model.buffers() if b.dtype.is_floating_point or b.dtype == torch.bool]
        if self._buffers_of is not self.model or len(bufs) != len(self._buffers) or any(
                a is not b for a, b in zip(bufs, self._buffers)):
            self._buffers, self._buffers_of = bufs, self.model
            self._before = [b.detach().clone() for b in bufs]

    # -- per step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        self._track_buffers()
        if self._buffers:
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(self._before, self._buffers)
            else:
                for d, s in zip(self._before, self._buffers):
                    d.copy_(s)

    @torch.no_grad()
    def _undo_buffers(self) -> None:
        if self._buffers_of is not self.model:
            return
        for b, saved in zip(self._buffers, self._before):
            if b.shape == saved.shape:
                b.copy_(saved)

    def good_step(self) -> None:
        self.consecutive = 0

    def bad_step(self, iteration: int, what: str) -> Optional[str]:
        """Account for a skipped step; restore or stop per the policy. Returns a message to show, if any."""
        self._undo_buffers()
        self.optimizer.zero_grad(set_to_none=True)
        return self._apply(iteration, 1, self.consecutive + 1, what, what,
                           f"non-finite {what} at iteration {iteration}: step skipped", f"at iteration {iteration}")

    def observe(self, new_bad: int, consecutive: int, iteration: int) -> Optional[str]:
        """The device-side (sync-free) path: `new_bad` steps were skipped since the last look (the GradScaler skipped
        their updates on the device), the last `consecutive` of them in a row. Same policy, applied at log steps."""
        return self._apply(iteration, new_bad, consecutive, f"{new_bad} non-finite step(s)", "loss",
                           f"{new_bad} non-finite step(s) skipped before iteration {iteration}",
                           f"before iteration {iteration}")

    def _apply(self, iteration: int, new_bad: int, consecutive: int, event: str, what: str, skipped_msg: str,
               when: str) -> Optional[str]:
        """The policy, for both paths: count, stop past max_skipped, restore after max_consecutive in a row (stop
        past max_restores)."""
        p = self.policy
        self.skipped += new_bad
        self.consecutive = consecutive
        self.events.append({"iteration": iteration, "what": event})
        if p.max_skipped is not None and self.skipped > p.max_skipped:
            self.stop(iteration, f"{self.skipped} steps with a non-finite {what} (train.nan_policy.max_skipped="
                                 f"{p.max_skipped})")
        if consecutive < p.max_consecutive:
            return f"{skipped_msg} ({self.skipped} so far)"
        if self.restores >= p.max_restores:
            self.stop(iteration, f"{consecutive} non-finite steps in a row after {self.restores} restores "
                                 f"(train.nan_policy.max_restores={p.max_restores})")
        self.restore()
        self.consecutive = 0
        return (f"{consecutive} non-finite steps in a row {when}: restored the last good "
                f"state (iteration {self._good_iteration()}) and lowered the learning rate by {p.lr_factor} "
                f"(restore {self.restores}/{p.max_restores})")

    # -- last good state -----------------------------------------------------------------------------------------
    def snapshot(self, iteration: int) -> None:
        """Remember the current state as good (called when a checkpoint is written after a finite step)."""
        if self.consecutive:
            return
        self._good = {  # on the host: no extra accelerator memory
            "iteration": iteration,
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
        }

    def _good_iteration(self):
        return self._good["iteration"] if self._good else None

    def restore(self) -> None:
        good = self._good
        same = good is not None and {k: tuple(v.shape) for k, v in self.model.state_dict().items()} == {
            k: tuple(v.shape) for k, v in good["model"].items()}
        if same:  # (a prune step since the snapshot changes the architecture: then only the lr is lowered)
            self.model.load_state_dict(good["model"])
            self.optimizer.load_state_dict(good["optimizer"])
            getattr(self.owner, "invalidate_step", lambda: None)()  # (new optimizer state tensors)
        self.restores += 1
        f = self.policy.lr_factor
        self.lr_scale *= f
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * f for lr in self.scheduler.base_lrs]
        for g in self.optimizer.param_groups:
            g["lr"] *= f
            if "initial_lr" in g:
                g["initial_lr"] *= f

    def stop(self, iteration: int, why: str) -> None:
        raise DivergedError(
            f"training diverged at iteration {iteration}: {why}. Stopped; best.pt and the last good last.pt are "
            f"kept. Try a lower train.lr (now x{self.lr_scale:g}), train.grad_clip, or check the images")

    # -- resume --------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "restores": self.restores,
                "lr_scale": self.lr_scale, "events": self.events[-100:]}

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        self.skipped = int(st.get("skipped", 0))
        self.consecutive = int(st.get("consecutive", 0))
        self.restores = int(st.get("restores", 0))
        self.lr_scale = float(st.get("lr_scale", 1.0))
        self.events = list(st.get("events", []))
