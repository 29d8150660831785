"""The kinds of stage a staged run composes (`stages:` in the config), each a set of act.run.hooks.RunHooks.

* `QuantStage`: distillation QAT of the previous stage's student (quantization is switched on by the stage config).
* `PruneStage`: structured pruning to a MACs/params target in steps (act.blocks.prune_schedule), distilling in between.
* `SparsityStage`: 2:4 (or N:M) weight masks computed once and kept through training (act.blocks.sparsity); the stages after
  it keep the zeros with `KeptSparsity`.

* `DistillStage`: plain distillation, no structural change (e.g. a longer recovery after pruning).

Each kind is declared once: its config model (a StageConfig subclass: the keys of its `stages:` entry) and its hooks,
registered together in act.core.registry.STAGE_KINDS (`@STAGE_KINDS.register(type, config=...)`), from which the
config validates `stages:`. A new kind is one such pair, here or in user code.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from act.blocks.checkpoint import atomic_save, load_checkpoint
from act.blocks.distill import update_channel_map
from pydantic import Field
from typing_extensions import Literal

from act.core.config.stages import StageConfig
from act.core.errors import ConfigError
from act.core.registry import STAGE_KINDS
from act.run.hooks import RunHooks
from act.blocks.prune import (ChannelScale, PruningPlan, StructuredPruner, accumulate_grads, fold_batchnorm, has_batchnorm)
from act.blocks.prune_schedule import PruneSchedule
from act.blocks.sparsity import SparsityMasks


# ---- the config model of each stage type ------------------------------------------------------------------------
class PruneStageConfig(StageConfig):
    """Structured channel pruning (torch-pruning DepGraph) in `steps` steps with distillation between them."""

    type: Literal["prune"]
    target: float = Field(0.6, gt=0, lt=1, description="keep this share of the teacher's MACs (or params)")
    metric: Literal["macs", "params"] = "macs"
    scope: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: every layer loses the same share of channels; global: one ranking over all")
    importance: Literal["l1", "l2", "group_norm", "lamp", "taylor"] = Field(
        "l2", description="channel-group importance: magnitude (l1 / l2 = group_norm), LAMP, or first-order Taylor "
                          "on the distillation loss")
    steps: int = Field(4, ge=1, description="pruning steps, each to a linearly smaller share of the MACs")
    step_iterations: Optional[int] = Field(
        None, ge=1, description="distillation iterations between pruning steps; default: half the stage's "
                                "iterations / steps (the rest, after the last step, fine-tunes)")
    taylor_batches: int = Field(4, ge=1, description="distillation batches whose gradients feed Taylor importance")
    decay_iterations: int = Field(
        0, ge=0, description="gradual removal: each pruning step decides its channels at its iteration, shrinks them "
                             "linearly to zero over this many distillation iterations while the rest of the network "
                             "learns to do without them, then removes them (which then changes nothing). 0: removed "
                             "at once. Must be shorter than step_iterations")
    max_layer_ratio: float = Field(0.8, gt=0, lt=1, description="no layer loses more than this share of channels")
    close_gap: bool = Field(
        False, description="scope uniform: where round_to's staircase leaves the MACs (params) more than 2% off a "
                           "step's goal, stop on the stair above and remove the rest with one global ranking over the "
                           "layers outside the head (at most a quarter of any layer). false: the nearest stair. It "
                           "lands on the target but cost accuracy where measured (GPU: 0.64x -> 0.60x took pose mAP "
                           "0.198 -> 0.137, taking the MACs from deep layers); a smaller round_to reaches the target "
                           "more cheaply (round_to 4: 0.61x, 0.193)")
    round_to: Optional[int] = Field(
        8, ge=2, description="keep channel counts multiples of this (odd widths run slower than the unpruned model in "
                             "onnxruntime / TensorRT kernels); null: any width")
    ignore: List[str] = Field(default_factory=list,
                              description="module-name globs (or 're:' regexes) whose output channels stay")
    keep_branches: List[Literal["box", "cls", "kpt"]] = Field(
        default_factory=list, description="head branches whose convs all keep their width (the model family knows "
                                          "which modules they are), e.g. [kpt]: the keypoint branch's hidden convs "
                                          "are no wider than its 51 outputs (docs/pruning.md); the other layers then "
                                          "lose more to meet the target")
    bias_compensation: bool = Field(
        True, description="fold the mean of each removed input channel (over a batch) into the next conv's bias "
                          "(BN-folded students only: a BatchNorm in train mode re-centres by itself)")
    keep_batchnorm: bool = Field(
        True, description="the first stage's student trains with the model's BatchNorm layers (loaded un-folded; "
                          "normalization makes the pruned network far easier to retrain) and they are folded into "
                          "the convs when the stage ends (best.pt, ONNX). false: the BN-folded student of QAT. "
                          "Under DDP the student is always BN-folded")


class SparsityStageConfig(StageConfig):
    """Fine-grained sparsity kept by masks through this and every later stage; weights stay dense with zeros."""

    type: Literal["sparsity"]
    pattern: Literal["2:4", "unstructured"] = Field(
        "2:4", description="2:4: two of every four weights along the input channels are zero (TensorRT sparse tensor "
                           "cores); unstructured: the smallest weights by magnitude")
    ratio: float = Field(0.5, gt=0, lt=1, description="unstructured: share of weights set to zero")
    scope: Literal["layer", "global"] = Field("layer", description="unstructured: threshold per layer or global")
    ignore: List[str] = Field(default_factory=list, description="module-name globs (or 're:' regexes) kept dense")


class QuantStageConfig(StageConfig):
    """Fake-quantization (the top-level quant section) + distillation."""

    type: Literal["quant"]


class DistillStageConfig(StageConfig):
    """Plain distillation, no structural change (e.g. a longer recovery after pruning)."""

    type: Literal["distill"]


# ---- the kinds -----------------------------------------------------------------------------------------------------
class StageKind(RunHooks):
    """One stage of a staged run: its config entry, its position, and what it adds to the stage's summary."""

    def __init__(self, stage, index: int):
        self.stage, self.index = stage, index

    def prepare(self, run, student: nn.Module) -> nn.Module:
        """The stage's float student before quantization (a prune stage makes it prunable)."""
        return student

    def state_dict(self) -> Dict[str, Any]:
        return {"stage": {"index": self.index, "label": self.stage.label, "type": self.stage.type}}

    def info(self, run) -> Dict[str, Any]:
        """summary.json's `stage` entry."""
        return {"index": self.index, "name": self.stage.label, "type": self.stage.type}


@STAGE_KINDS.register("quant", config=QuantStageConfig)
class QuantStage(StageKind):
    """Distillation QAT (the stage's config switches quantization on)."""


@STAGE_KINDS.register("distill", config=DistillStageConfig)
class DistillStage(StageKind):
    """Distillation of the float student; nothing else changes."""


@STAGE_KINDS.register("sparsity", config=SparsityStageConfig)
class SparsityStage(StageKind):
    """Masks computed once after calibration, applied after every optimizer step."""

    def __init__(self, stage, index: int):
        super().__init__(stage, index)
        self.masks: Optional[SparsityMasks] = None

    def ignore(self, run) -> List[str]:
        """Layers the masks leave dense: the family's float layers and the stage's `ignore`."""
        return list(run.family.float_patterns) + list(self.stage.ignore)

    def calibrated(self, run) -> None:
        sp = self.stage
        self.masks = SparsityMasks.compute(run.student, sp.pattern, sp.ratio, sp.scope, self.ignore(run))
        self.masks.apply(run.student)
        print(f"act: sparsity {sp.pattern}: {self.masks.stats(run.student)}")

    def after_step(self, run) -> None:
        if self.masks is not None:
            self.masks.apply(run.student)

    def resumed(self, run, ckpt) -> None:
        self.masks = SparsityMasks.from_zeros(run.student, self.stage.pattern, self.ignore(run))

    def info(self, run) -> Dict[str, Any]:
        info = super().info(run)
        if self.masks is not None:
            info["sparsity"] = self.masks.stats(run.student)
        return info


class KeptSparsity(SparsityStage):
    """A stage after a sparsity stage: the zeros of its student stay zero (masks from the zeros it starts with)."""

    def __init__(self, spec):
        super().__init__(spec, -1)

    def setup(self, run) -> None:
        self.resumed(run, None)

    def calibrated(self, run) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def info(self, run) -> Dict[str, Any]:
        return {"sparsity": self.masks.stats(run.student)} if self.masks is not None else {}


@STAGE_KINDS.register("prune", config=PruneStageConfig)
class PruneStage(StageKind):
    """Structured pruning in steps (see act.blocks.prune_schedule), with fresh optimizer state after each removal."""

    def __init__(self, stage, index: int):
        super().__init__(stage, index)
        self.steps_done = 0
        self.log: List[Dict[str, Any]] = []  # one entry per step taken
        self.pending: Optional[Dict[str, Any]] = None  # decay_iterations: a planned step whose channels are shrinking
        self._shrink: Optional[ChannelScale] = None  # its channels, looked up once (scaled after every step)
        self._pruning = False
        self.schedule: Optional[PruneSchedule] = None

    # ---- student ------------------------------------------------------------------------------------------------
    def build_student(self, run) -> Optional[nn.Module]:
        if self.stage.keep_batchnorm and not run.dist.enabled:
            # the teacher's network with its BatchNorm layers (folded when the stage ends: before_delivery)
            return run.family.load(run.source.path, run.source.kind).float()
        return None

    def prepare(self, run, student: nn.Module) -> nn.Module:
        run.family.prepare_for_pruning(student)
        return student

    def setup(self, run) -> None:
        self.feature_convs(run)  # distill.features it could not follow through pruning: fail before any work
        self.schedule = PruneSchedule.of(self.stage, run.total_iters, self.index)

    def saving_paused(self) -> bool:
        return self._pruning

    # ---- the steps ----------------------------------------------------------------------------------------------
    def before_iteration(self, run, it: int, batches) -> None:
        if self.pending is not None:
            if not self.schedule.removal_due(it, self.pending["start"]):
                return
            self.apply_planned(run, it)
        k = self.schedule.step(it, self.steps_done)
        if k is not None:
            self.prune_step(run, k, it, batches)

    def after_step(self, run) -> None:
        if self.pending is not None:  # the planned channels: linearly from their value at the plan to 0
            if self._shrink is None:
                self._shrink = ChannelScale(run.student, self.pending["plan"].removed)
            self._shrink(self.schedule.shrink_factor(run.iteration, self.pending["start"]))

    def prune_step(self, run, k: int, it: int, batches) -> None:
        """Pruning step k of the stage (1-based): prune to the schedule's goal, then a fresh optimizer (the pruned
        layers hold new parameters). With decay_iterations the step only decides the channels now (a plan);
        after_step shrinks them and apply_planned removes them."""
        st = self.stage
        t0 = time.time()
        self._pruning = True
        target = self.schedule.goal(k, run.teacher_cost[0 if st.metric == "macs" else 1])
        have_grads = False
        # under DDP every rank must remove the same channels: gradients and channel means are rank-averaged
        reduce = (lambda t: run.dist.sum(t) / run.dist.world_size) if run.dist.enabled else None
        if st.importance == "taylor":
            loss = accumulate_grads(run.student, lambda: run.distill_loss(next(batches)), st.taylor_batches)
            if reduce is not None:
                loss = float(reduce(torch.tensor(loss, device=run.device)))
                for prm in run.student.parameters():
                    if prm.grad is not None:
                        prm.grad = reduce(prm.grad)
            have_grads = loss > 1e-9
        pruner = StructuredPruner(run.family, st, imgsz=run.cfg.data.imgsz)
        if st.decay_iterations:
            plan = pruner.plan(run.student, target, have_grads=have_grads)
            run.student.zero_grad(set_to_none=True)
            run.drop_captures()
            plan.info.update(step=k, iteration=it, target=target, planned_s=round(time.time() - t0, 2))
            self.pending = {"step": k, "start": it, "plan": plan}
            run.logger.scalars("prune", {"planned_channels": plan.channels(), "step": k}, it)
            print(f"act: pruning step {k}/{st.steps} at iteration {it}: {plan.channels()} output channels (of convs "
                  f"and BatchNorms) chosen; they shrink to zero over {st.decay_iterations} iterations and go at "
                  f"iteration {it + st.decay_iterations} ({plan.info['macs'] / run.teacher_cost[0]:.3f}x MACs)")
            self._pruning = False
            return
        # for bias compensation: input means per channel (a student with BatchNorm re-centres by itself)
        images = None if has_batchnorm(run.student) else run.model_input(next(batches))
        track = self.feature_convs(run)
        widths = {name: conv.out_channels for name, conv in track.items()}
        info = pruner.prune_to(run.student, target, have_grads=have_grads, images=images, reduce=reduce, track=track)
        if track:
            update_channel_map(run.student, info.pop("removed", {}), widths)
            run.update_channel_maps()
        run.drop_captures()
        info.update(step=k, iteration=it, target=target, time_s=round(time.time() - t0, 2))
        self._pruned(run, k, it, info)

    def apply_planned(self, run, it: int) -> None:
        """Remove the channels of the pending plan (zero by now): the end of a decaying pruning step."""
        t0 = time.time()
        self._pruning = True
        k, plan = self.pending["step"], self.pending["plan"]
        names = {m: n for n, m in run.student.named_modules()}
        track = self.feature_convs(run)
        widths = {n: conv.out_channels for n, conv in track.items()}
        StructuredPruner(run.family, self.stage, imgsz=run.cfg.data.imgsz).apply(run.student, plan)
        if track:
            update_channel_map(run.student, {n: plan.removed.get(names[conv], []) for n, conv in track.items()},
                               widths)
            run.update_channel_maps()
        info = dict(plan.info, decayed_from=self.pending["start"], iteration=it, time_s=round(time.time() - t0, 2))
        self.pending = self._shrink = None
        self._pruned(run, k, it, info)

    def _pruned(self, run, k: int, it: int, info: Dict[str, Any]) -> None:
        """After pruning step k removed its channels at iteration `it`: log, fresh optimizer, best.pt restarts."""
        st = self.stage
        info.update(macs_ratio=info["macs"] / run.teacher_cost[0], params_ratio=info["params"] / run.teacher_cost[1])
        self.log.append(info)
        self.steps_done = k
        run.restart_training(it)  # torch-pruning replaced the parameters in place
        run.logger.scalars("prune", {"macs_ratio": info["macs_ratio"], "params_ratio": info["params_ratio"],
                                     "step": k}, it)
        print(f"act: pruning step {k}/{st.steps} at iteration {it}: MACs {info['macs_ratio']:.3f}x, params "
              f"{info['params_ratio']:.3f}x of the teacher ({info['importance']} importance, {info['time_s']} s)")
        if not info["reached"]:
            print(f"act: pruning step {k}: the nearest width is {info[st.metric] / info['target']:.3f}x the step's goal "
                  f"(round_to {st.round_to} makes the {st.metric} a staircase): a smaller round_to, or close_gap: true, "
                  f"gets closer (docs/pruning.md)")
        self._pruning = False

    def feature_convs(self, run) -> Dict[str, nn.Module]:
        """Feature node -> the conv that produces its channels (the family knows which), whose removed output
        channels a pruning step records so the feature loss keeps matching the teacher channels that stay. (The
        student is prepared for pruning already: build_student, or the checkpoint it resumed from.)"""
        modules = dict(run.student.named_modules())
        track = {n.name: run.family.output_conv(modules[n.name]) for n in run.feature_nodes}
        untracked = {k: type(modules[k]).__name__ for k, v in track.items() if v is None}
        if untracked:
            raise ConfigError(f"invalid config:\n  distill.features: {untracked}: act cannot tell which conv produces "
                              f"these modules' channels, so a pruned student's cannot be matched to the teacher's "
                              f"(name a conv, an Ultralytics Conv, or a C2f / C3k2 / C3 / SPPF block)")
        return track

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        st = super().state_dict()
        st["stage"].update(prune_steps_done=self.steps_done, prune_log=self.log,
                           pending=None if self.pending is None else
                           dict(self.pending, plan=self.pending["plan"].state_dict()))
        return st

    def resume(self, run, ckpt) -> None:
        """The checkpoint's architecture (pruned) replaces the freshly built student; the steps taken come back."""
        run.replace_student(ckpt["model"])
        st = ckpt["act"].get("stage", {})
        self.steps_done = int(st.get("prune_steps_done", 0))
        self.log = list(st.get("prune_log", []))
        pending = st.get("pending")
        self.pending = None if pending is None else dict(pending, plan=PruningPlan.from_state(pending["plan"]))
        self._shrink = None  # (the resumed student holds new parameters)

    # ---- delivery -----------------------------------------------------------------------------------------------
    def before_delivery(self, run, checkpoint: str, extra: Dict[str, Any]) -> None:
        if has_batchnorm(run.student):  # keep_batchnorm: what the stage hands on and exports is BN-folded
            path = run.out / checkpoint
            ckpt = load_checkpoint(path)
            fold_batchnorm(ckpt["model"], run.family)
            atomic_save(ckpt, path)
            extra.setdefault("stage", {})["batchnorm"] = "trained, folded at the end of the stage"

    def info(self, run) -> Dict[str, Any]:
        info = super().info(run)
        if self.log:
            info["prune_steps"] = self.log
        return info



def stage_hooks(stages, index: int) -> List[RunHooks]:
    """The hooks of stage `index`: its kind first, then what earlier stages hand on (the zeros of a sparsity
    stage)."""
    stage = stages[index]
    hooks: List[RunHooks] = [STAGE_KINDS[stage.type](stage, index)]
    spec = next((s for s in reversed(stages[:index]) if s.type == "sparsity"), None)
    if spec is not None and stage.type != "sparsity":
        hooks.append(KeptSparsity(spec))
    return hooks
