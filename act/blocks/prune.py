"""Structured channel pruning of a student with torch-pruning (DepGraph), to a target share of the teacher's MACs or
parameters.

    pruner = StructuredPruner(family, stage)            # stage: an act.core.config.PruneStage
    info = pruner.prune_to(student, target_macs)         # in place; returns what it did

    plan = pruner.plan(student, target_macs)             # or: decide now, remove later (stage decay_iterations)
    scale_channels(student, plan.removed, 0.5)           # shrink what the plan removes while training goes on
    pruner.apply(student, plan)                          # zero those channels and remove them

The model family prepares the model (Ultralytics C2f/C3k2 chunk splits become two convs, see
families/ultralytics/prune.py) and names the modules whose channels stay (the head's last convs: the distillation
nodes; the DFL decode; attention blocks). torch-pruning's channel ratio for the target is searched on deep copies
(MACs counted after each trial), then applied to the model: the result lands within 2% of the target. MACs are counted
at the run's imgsz (attention MACs grow faster than H*W, so the ratio depends on it). Importance: L1 / L2 magnitude
of the whole dependency group, LAMP, or first-order Taylor (|w * dL/dw|) on gradients of the distillation loss that
the caller accumulated into the student's `.grad` (see `accumulate_grads`).
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch_pruning as tp
from torch import nn

from act.core.errors import ActError

TRACE_IMGSZ = 160  # MACs of a conv net scale with H*W, so their ratio does not depend on the traced size
# close_gap's global pass takes at most this share of any layer's channels (as the pass finds them): uncapped, its
# magnitude ranking took 24 of the 32 channels of the P3 neck's first conv to close a 0.64x -> 0.60x gap (GPU: pose
# mAP 0.198 -> 0.136; torch-pruning's max_pruning_ratio only skips layers already below it, it does not cap a cut)
GAP_MAX_LAYER_SHARE = 0.25


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module, family=None) -> nn.Module:
    """Folds every BatchNorm into the conv before it, in place, the family's way (act.core.family.family_for(model) by
    default; Ultralytics: its own fuse of Conv/DWConv/RepConv...). The training mode is kept."""
    if has_batchnorm(model):
        if family is None:
            from act.core.family import family_for

            family = family_for(model)
        was = model.training
        family.fold_batchnorm(model)
        model.train(was)
    return model


def drop_traces() -> None:
    """Free the autograd graphs that torch-pruning's dependency tracing leaves in reference cycles (about 180 tensors
    with a grad_fn after one pruning step of yolo11n-pose), which otherwise live until the cyclic collector happens to
    run. Alive, they keep AccumulateGrad nodes of the student's parameters made on the default stream, which is what
    torch's AccumulateGrad stream warning names before the next step's CUDA-graph capture (on its side stream)
    failed with "operation failed due to a previous error during capture" in two of four GPU prune runs."""
    gc.collect()


def model_cost(model: nn.Module, imgsz: int = TRACE_IMGSZ, family=None) -> Tuple[float, int]:
    """(MACs, parameters) of one image at imgsz x imgsz, by torch-pruning's counter (a deep copy runs, in eval), of
    the model as it deploys: a model that still has BatchNorm layers is counted with them folded."""
    if has_batchnorm(model):
        model = fold_batchnorm(copy.deepcopy(model), family)
    p = next(model.parameters())
    x = torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, x)
    return float(macs), int(params)


def importance_for(kind: str, have_grads: bool):
    """The torch-pruning importance of a config name. Taylor without gradients (the first step, where the student
    still equals the teacher and the distillation loss and its gradient are 0) falls back to L2 magnitude."""
    if kind == "taylor" and have_grads:
        return tp.importance.GroupTaylorImportance()
    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    return tp.importance.GroupMagnitudeImportance(p=2)  # l2, group_norm (group L2 norm), taylor w/o grads


def accumulate_grads(model: nn.Module, loss_fn: Callable[[], torch.Tensor], batches: int) -> float:
    """Zero the student's grads, then backward `loss_fn()` `batches` times (the grads add up). Returns the mean loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(batches):
        loss = loss_fn()
        loss.backward()
        total += float(loss.detach())
    return total / max(batches, 1)


class StructuredPruner:
    """Prunes a (float, BN-folded) student in place towards a MACs or params target.

    torch-pruning's channel ratio does not map linearly to MACs, and with `round_to` the map is a staircase, so the
    ratio is searched: trials prune deep copies (a first guess from MACs ~ (1 - r)^2, then interpolation inside the
    bracket of ratios above / below the target) until one lands within `tolerance` of the target; the closest trial's
    ratio then prunes the model itself (the same importances, so the same channels: the copies get the gradients too)."""

    def __init__(self, family, stage, imgsz: int = TRACE_IMGSZ, tolerance: float = 0.02, max_trials: int = 8):
        self.family = family
        self.stage = stage
        self.imgsz = imgsz
        self.tolerance = tolerance
        self.max_trials = max_trials

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.family.prepare_for_pruning(model)

    def _prune_at(self, model: nn.Module, ratio: float, have_grads: bool,
                  means: Optional[Dict[str, torch.Tensor]] = None,
                  track: Optional[Dict[str, nn.Module]] = None, scope: Optional[str] = None,
                  history: Optional[List[list]] = None) -> Dict[str, List[int]]:
        """Prune `model` with torch-pruning's channel ratio `ratio`. Returns, for each conv / BatchNorm in `track`
        (name -> module), the indices of the output channels it lost; appends torch-pruning's pruning history of this
        pass (root module name, output channels?, indices per group, in order) to `history`."""
        st = self.stage
        p = next(model.parameters())
        example = torch.zeros(1, 3, TRACE_IMGSZ, TRACE_IMGSZ, device=p.device, dtype=p.dtype)
        gap_pass = st.scope == "uniform" and scope == "global"
        # the gap-closing pass leaves the head alone: a global magnitude ranking would take most of it from a few
        # small head convs (a class-branch conv 48 -> 8 to close a 6% gap)
        keep = ("box", "cls", "kpt") if gap_pass else st.keep_branches
        ignored = list(self.family.prune_ignored(model, keep)) + self._ignored_by_name(model)
        try:
            pruner = tp.pruner.MetaPruner(
                model, example, importance=importance_for(st.importance, have_grads),
                global_pruning=(scope or st.scope) == "global", pruning_ratio=ratio,
                max_pruning_ratio=st.max_layer_ratio,
                iterative_steps=1, ignored_layers=ignored, round_to=st.round_to,
                forward_fn=self.family.prune_forward,
            )
        except Exception as e:  # an architecture DepGraph cannot follow
            raise ActError(f"torch-pruning could not build the dependency graph of the student: "
                           f"{type(e).__name__}: {e}") from e
        names = {m: n for n, m in model.named_modules()}
        tracked = {id(conv): name for name, conv in (track or {}).items()}
        removed: Dict[str, set] = {}
        for group in pruner.step(interactive=True):
            if gap_pass:
                group = self._capped(pruner, group)
                if group is None:
                    continue
            if means:
                compensate_bias(group, pruner.DG, names, means)
            for dep, idxs in group:
                name = tracked.get(id(dep.target.module))
                if name is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    removed.setdefault(name, set()).update(int(i) for i in idxs)
            group.prune()
        if history is not None:
            history.append([[name, bool(out), [int(i) for i in idxs]]
                            for name, out, idxs in pruner.DG.pruning_history()])
        return {k: sorted(v) for k, v in removed.items()}

    def _capped(self, pruner, group):
        """`group` with at most GAP_MAX_LAYER_SHARE of its root layer's channels (a multiple of round_to): the least
        important of those it would remove. None where that leaves nothing to remove."""
        dep, idxs = group[0]
        width = pruner.DG.get_out_channels(dep.target.module)
        if not width or not pruner.DG.is_out_channel_pruning_fn(dep.handler):
            return group
        cap = int(width * GAP_MAX_LAYER_SHARE)
        if self.stage.round_to:
            cap -= cap % self.stage.round_to
        if len(idxs) <= cap:
            return group
        if cap <= 0:
            return None
        full = pruner.DG.get_pruning_group(dep.target.module, dep.handler, list(range(width)))
        imp = pruner.estimate_importance(full)
        if imp is None or len(imp) != width:  # (channel groups: keep torch-pruning's order)
            chosen = list(idxs)[:cap]
        else:
            chosen = sorted(idxs, key=lambda i: float(imp[i]))[:cap]
        return pruner.DG.get_pruning_group(dep.target.module, dep.handler, sorted(int(i) for i in chosen))

    def prune_to(self, model: nn.Module, target: float, have_grads: bool = False,
                 images: Optional[torch.Tensor] = None, progress: Optional[Callable[[Dict], None]] = None,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 track: Optional[Dict[str, nn.Module]] = None, history: Optional[List[list]] = None) -> Dict:
        """Prune until the stage's metric (macs | params, of one imgsz image) is as close to `target` as the search
        gets (within `tolerance` unless round_to's staircase has no step there; with scope uniform and close_gap, a
        global pass then removes what the uniform staircase left above the target).
        Returns {macs, params, trials, channel_ratio, global_ratio, importance, reached}, and with `track` (name ->
        conv / BatchNorm of `model`) `removed`: name -> the indices of the output channels that module lost. With
        `history` (a list), each pass's torch-pruning pruning history is appended to it (see `apply`)."""
        st = self.stage
        self.prepare(model)
        which = 0 if st.metric == "macs" else 1
        start_cost = model_cost(model, self.imgsz)
        start = start_cost[which]
        info = {"macs": start_cost[0], "params": start_cost[1], "trials": 0, "channel_ratio": 0.0,
                "reached": start <= target * (1 + self.tolerance),
                "importance": "taylor" if st.importance == "taylor" and have_grads else
                ("l2" if st.importance in ("taylor", "group_norm") else st.importance)}
        widths = {name: out_width(m) for name, m in (track or {}).items()}
        kept = {name: list(range(w)) for name, w in widths.items()}  # positions (at the start) still there
        if track:
            info["removed"] = {}
        if info["reached"]:
            return info
        if have_grads:  # Taylor reads every layer's grad; layers outside the training forward (DFL) have none
            for prm in model.parameters():
                if prm.grad is None:
                    prm.grad = torch.zeros_like(prm)
        was = model.training
        means = input_means(model, images) if images is not None and st.bias_compensation else None
        if means and reduce is not None:  # e.g. the mean over DDP ranks
            means = {k: reduce(v) for k, v in means.items()}
        passes = [st.scope] + (["global"] if st.scope == "uniform" and st.close_gap else [])
        cost = start
        for scope in passes:
            if scope != st.scope:
                if cost <= target * (1 + self.tolerance):
                    break  # the uniform pass got there
                if means:  # the channels changed: means of the pruned network's inputs
                    means = input_means(model, images)
                    if reduce is not None:
                        means = {k: reduce(v) for k, v in means.items()}
            trials = self._search(model, target, cost, which, have_grads, means, scope, progress)
            info["trials"] += len(trials)
            if len(passes) > 1 and scope == st.scope:  # the gap pass can only remove: stay on the stair above
                above = [r for r in trials if trials[r] >= target * (1 - self.tolerance)]
                best = min(above, key=lambda r: trials[r])
            else:
                best = min(trials, key=lambda r: (abs(trials[r] / target - 1), trials[r] > target))
            info["channel_ratio" if scope == st.scope else "global_ratio"] = round(best, 4)
            if best > 0:
                removed = self._prune_at(model, best, have_grads, means, track, scope=scope, history=history)
                for name, gone in removed.items():
                    gone = set(gone)
                    kept[name] = [k for i, k in enumerate(kept[name]) if i not in gone]
                cost = model_cost(model, self.imgsz)[which]
        final = model_cost(model, self.imgsz)
        info.update(macs=final[0], params=final[1], reached=abs(final[which] / target - 1) <= self.tolerance)
        if track:  # relative to the widths this call started from
            info["removed"] = {name: sorted(set(range(widths[name])) - set(kept[name])) for name in kept}
        model.train(was)
        model.zero_grad(set_to_none=True)
        drop_traces()
        return info

    def plan(self, model: nn.Module, target: float, have_grads: bool = False,
             progress: Optional[Callable[[Dict], None]] = None) -> "PruningPlan":
        """What `prune_to(model, target)` would remove, decided now on a copy; `model` (prepared for pruning, in
        place) keeps its channels until `apply`. Meanwhile `scale_channels(model, plan.removed, f)` can shrink the
        channels to go, so that removing them changes nothing (no bias compensation: they are zero by then)."""
        self.prepare(model)
        trial = copy.deepcopy(model)
        if have_grads:  # deepcopy of a Parameter drops .grad
            for src, dst in zip(model.parameters(), trial.parameters()):
                dst.grad = None if src.grad is None else src.grad.clone()
        track = {n: m for n, m in trial.named_modules() if out_width(m)}
        history: List[list] = []
        info = self.prune_to(trial, target, have_grads, progress=progress, track=track, history=history)
        del trial
        removed = {k: v for k, v in info.pop("removed", {}).items() if v}
        return PruningPlan(history=history, removed=removed, info=info)

    def apply(self, model: nn.Module, plan: "PruningPlan") -> nn.Module:
        """Remove the channels of `plan` from `model` (the architecture it was planned on): they are set to zero
        first, then torch-pruning replays the plan's pruning history, pass by pass, on a dependency graph of `model`."""
        self.prepare(model)
        scale_channels(model, plan.removed, 0.0)
        p = next(model.parameters())
        example = torch.zeros(1, 3, TRACE_IMGSZ, TRACE_IMGSZ, device=p.device, dtype=p.dtype)
        for history in plan.history:
            try:
                with torch.enable_grad():  # DepGraph traces through autograd
                    graph = tp.DependencyGraph().build_dependency(model, example,
                                                                  forward_fn=self.family.prune_forward)
                graph.load_pruning_history(history)
            except Exception as e:
                raise ActError(f"could not apply the pruning plan to the student (not the architecture it was "
                               f"planned on?): {type(e).__name__}: {e}") from e
        graph = None  # noqa: F841 - its traces go with it
        drop_traces()
        return model

    def _search(self, model: nn.Module, target: float, start: float, which: int, have_grads: bool,
                means: Optional[Dict[str, torch.Tensor]], scope: str,
                progress: Optional[Callable[[Dict], None]]) -> Dict[float, float]:
        """Channel ratio -> cost of trials on deep copies, until one lands within `tolerance` of `target` (a first
        guess from cost ~ (1 - r)^2, then interpolation inside the bracket of ratios above / below the target).
        Not pruning at all (ratio 0) is a candidate too: on round_to's staircase the smallest real cut can land much
        further from a step's target than where the model already is (a 0.8x target from 0.82x jumped to 0.66x)."""
        cap = self.stage.max_layer_ratio
        trials: Dict[float, float] = {}
        lo, c_lo, hi, c_hi, exponent = 0.0, start, None, None, 2.0
        sides = []
        for _ in range(self.max_trials):
            if hi is None:
                r = min(cap, max(lo + 0.002, 1 - (target / start) ** (1 / exponent)))
            elif len(sides) >= 2 and sides[-1] == sides[-2]:  # interpolation stuck on one side: bisect
                r = (lo + hi) / 2
            else:  # log-linear interpolation inside the bracket
                f = (math.log(c_lo) - math.log(target)) / max(math.log(c_lo) - math.log(c_hi), 1e-9)
                r = min(hi - 0.001, max(lo + 0.001, lo + (hi - lo) * f))
            if r in trials:
                break
            trial = copy.deepcopy(model)
            if have_grads:  # deepcopy of a Parameter drops .grad
                for src, dst in zip(model.parameters(), trial.parameters()):
                    dst.grad = None if src.grad is None else src.grad.clone()
            self._prune_at(trial, r, have_grads, means, scope=scope)
            c = trials[r] = model_cost(trial, self.imgsz)[which]
            del trial
            if progress:
                progress({"channel_ratio": r, "cost": c, "target": target, "scope": scope})
            if abs(c / target - 1) <= self.tolerance:
                break
            sides.append(c > target)
            if c > target:
                lo, c_lo = r, c
                if 0 < c < start:
                    exponent = max(0.5, math.log(c / start) / math.log(1 - r))
                if r >= cap:
                    break  # max_layer_ratio allows no more
            else:
                hi, c_hi = r, c
            if hi is not None and hi - lo < 0.002:
                break
        trials.setdefault(0.0, start)
        return trials

    def _ignored_by_name(self, model: nn.Module):
        from act.blocks.quant import matches_any

        pats = list(self.stage.ignore)
        return [m for n, m in model.named_modules() if n and pats and matches_any(n, pats)]


def out_width(m: nn.Module) -> int:
    """Output channels of a conv or an affine BatchNorm (what pruning removes channels from); 0 for other modules."""
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        return m.num_features
    return 0


@dataclass
class PruningPlan:
    """A pruning step decided ahead of removing anything: torch-pruning's pruning history of each pass (what
    `StructuredPruner.apply` replays), the output channels each conv / BatchNorm loses (module name -> indices in the
    model as planned: what `scale_channels` shrinks), and the step's info (MACs, params, ratios, importance)."""

    history: List[list]
    removed: Dict[str, List[int]]
    info: Dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history, "removed": self.removed, "info": self.info}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "PruningPlan":
        return cls(history=state["history"], removed=state["removed"], info=dict(state.get("info", {})))

    def channels(self) -> int:
        return sum(len(v) for v in self.removed.values())


class ChannelScale:
    """The listed output channels (module name -> indices) of a model's convs / BatchNorms, looked up once:
    `scale(factor)` multiplies their weights (conv: its output rows) and biases by `factor`, in place. Every producer
    of a pruned channel is listed (convs, BatchNorms), so at 0 the channel is exactly zero after SiLU and the layers
    reading it get nothing from it. (Built once per plan: decay_iterations scales after every optimizer step.)"""

    def __init__(self, model: nn.Module, removed: Dict[str, List[int]]):
        modules = dict(model.named_modules())
        self.targets = []
        for name, idxs in removed.items():
            if not idxs:
                continue
            m = modules.get(name)
            if m is None or max(idxs) >= out_width(m):
                raise ActError(f"pruning plan: the student has no module {name!r} with {max(idxs) + 1} or more output "
                               f"channels (not the architecture it was planned on)")
            idx = torch.as_tensor(idxs, device=m.weight.device, dtype=torch.long)
            self.targets += [(prm, idx) for prm in (m.weight, m.bias) if prm is not None]

    @torch.no_grad()
    def __call__(self, factor: float) -> None:
        for prm, idx in self.targets:
            prm[idx] *= factor


def scale_channels(model: nn.Module, removed: Dict[str, List[int]], factor: float) -> None:
    """Multiply the listed output channels' weights and biases by `factor`, in place (see ChannelScale)."""
    ChannelScale(model, removed)(factor)


@torch.no_grad()
def input_means(model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean of every input channel of every Conv2d over `images` (eval mode), by module name."""
    means: Dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: means.__setitem__(n, inp[0].float().mean(dim=(0, 2, 3)))))
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(images.to(p.device, p.dtype))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return means


@torch.no_grad()
def compensate_bias(group, DG, names: Dict[nn.Module, str], means: Dict[str, torch.Tensor]) -> None:
    """Before a group is pruned: every conv that loses input channels takes their mean contribution into its bias,
    bias += sum_k W[:, j, k] * mean(x_j). In a BN-folded network the channels of smallest weight are often nearly
    constant (silu of the folded BN shift), and dropping a constant input shifts every output of the next layer;
    this keeps the first moment (exact for a constant channel, away from the zero-padded border)."""
    for dep, idxs in group:
        conv = dep.target.module
        if (not isinstance(conv, nn.Conv2d) or DG.is_out_channel_pruning_fn(dep.handler) or conv.groups != 1
                or not idxs):
            continue
        mean = means.get(names.get(conv, ""))
        if mean is None or mean.numel() != conv.in_channels:
            continue
        idx = torch.as_tensor(list(idxs), device=conv.weight.device, dtype=torch.long)
        shift = conv.weight.detach()[:, idx].sum(dim=(2, 3)).float() @ mean.to(conv.weight.device)[idx]
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device,
                                                 dtype=conv.weight.dtype))
        conv.bias.data += shift.to(conv.bias.dtype)
