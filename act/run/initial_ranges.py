"""A run's initial activation ranges from a PTQ calibrator: one calibrator, or the best of several.

    loader = calibration_loader(run)                                  # the first ptq.num_images images, no augment
    result = calibrate(run, loader, "percentile", 99.99)              # ranges set on run.student
    best, rows = search(run, loader, cfg.auto.search, score)          # every candidate tried, the best kept

`search` collects the activation histograms once, then applies each candidate calibrator (act.blocks.quant.calibrators)
and evaluates the student with the run's evaluators (label-free fidelity against the teacher on held-out images; no
label is used); `score(metrics)` ranks them. act ptq, the PTQ probe of strategy auto and the calibration that starts
distillation QAT (`initial_ranges`: quant.init_from, quant.calibrator) all go through here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from pathlib import Path

from act.blocks import quant as Q
from act.blocks.checkpoint import load_checkpoint
from act.blocks.data import as_model_input, build_loader, resolve_source
from act.core.errors import ActError, ConfigError
from act.run.runner import fmt_metrics
from act.blocks.quant.histograms import (CalibrationResult, calibrate_ranges, collect_histograms, get_ranges,
                             ranges_from_histograms, set_ranges)


def calibration_loader(run, num_images: int = 0):
    """The first `num_images` (default ptq.num_images) images of ptq.source, else of the pool less its held-out
    fidelity slice, without augmentation."""
    cfg = run.cfg
    p = cfg.ptq
    if p.source:
        paths = resolve_source(p.source)
    elif getattr(run, "pool", None) is not None:
        paths = run.pool
    else:
        paths = resolve_source(cfg.data.train)
    data = cfg.data.model_copy(update={"max_images": None, "cache": False})
    return build_loader(data, seed=cfg.train.seed, shuffle=False, augment=False, paths=paths[: num_images or
                                                                                              p.num_images],
                        batch_size=p.batch_size or cfg.data.batch_size, letterbox_fn=run.family.letterbox)


def forward_loop(run, loader):
    """The calibration pass over `loader`: unreadable images counted in run.bad_images, captures dropped."""
    def loop(model):
        for images, bad in loader:
            if bad:
                run.bad_images.extend(b for b in bad if b not in run.bad_images)
            if images is not None and len(images):
                model(as_model_input(images, run.device))
        run.s_capture.pop()

    return loop


def label(candidate) -> str:
    c = candidate
    return f"{c.calibrator} {c.percentile:g}" if c.calibrator == "percentile" else c.calibrator


def calibrate(run, loader, calibrator: str, percentile: float = 99.99) -> CalibrationResult:
    """Ranges of `calibrator` over `loader`, set on run.student."""
    result = calibrate_ranges(run.student, forward_loop(run, loader), calibrator, percentile, run.cfg.ptq.bins)
    set_ranges(run.student, result.ranges)
    return result


@dataclass
class Tried:
    candidate: Any  # an act.core.config.PTQCandidate
    result: CalibrationResult
    metrics: Dict[str, float]
    score: Tuple = field(default=())

    @property
    def label(self) -> str:
        return label(self.candidate)


def search(run, loader, candidates: Sequence, score: Callable[[Dict[str, float]], Tuple],
           on_result: Callable[[int, Tried], None] = None) -> Tuple[Tried, List[Tried]]:
    """Try every candidate calibrator on one pass of histograms; set and return the best by `score(metrics)` (higher
    is better; the first of equals wins) and every candidate tried, in order."""
    top, hist = collect_histograms(run.student, forward_loop(run, loader), run.cfg.ptq.bins)
    tried: List[Tried] = []
    best = None
    for i, cand in enumerate(candidates):
        result = ranges_from_histograms(top, hist, cand.calibrator, cand.percentile)
        set_ranges(run.student, result.ranges)
        res = run.evaluate(run.student, 0)
        t = Tried(cand, result, res, score(res))
        tried.append(t)
        if on_result is not None:
            on_result(i, t)
        if best is None or t.score > best.score:
            best = t
    set_ranges(run.student, best.result.ranges)
    return best, tried


def fidelity_score(metric: str) -> Callable[[Dict[str, float]], Tuple]:
    """Rank by `metric` (NaN last), ties by the head SNR."""
    def score(res: Dict[str, float]) -> Tuple:
        v = res.get(metric, math.nan)
        return (v if not math.isnan(v) else -math.inf, res.get("fidelity_snr_db_mean", -math.inf))

    return score


# ---- where distillation QAT starts ---------------------------------------------------------------------------------
def initial_ranges(run, batches) -> Dict[str, Any]:
    """The activation ranges a training run starts from: quant.init_from's checkpoint; else quant.calibrator: a PTQ
    calibrator, the best of auto.search by label-free fidelity, or the moving average over calib_batches training
    batches (ema). Returns what was done (summary.json's quant_init)."""
    q = run.cfg.quant
    if not q.enabled:
        return {}
    if q.init_from:
        ranges_from_checkpoint(run, Path(q.init_from))
        return {"from": q.init_from}
    if q.calibrator != "ema":
        return calibrate_for_training(run, q.calibrator)
    n = q.calib_batches
    if n == 0:
        Q.calibrate(run.student, lambda m: None, init_alpha=False)
    else:
        def loop(model):
            for _, images in zip(range(n), batches):
                model(as_model_input(images, run.device))
                run.s_capture.pop()

        Q.calibrate(run.student, loop, init_alpha=q.activation.alpha_init == "auto")
    return {"ema_batches": n}


def ranges_from_checkpoint(run, path: Path) -> None:
    """Start every activation quantizer (moving average and PACT alpha) at the range it has in an act checkpoint
    of the same teacher, e.g. the ptq.pt of `act ptq`."""
    ckpt = load_checkpoint(path)
    theirs = Path(str(ckpt["act"].get("teacher", ""))).name
    if theirs != run.source.path.name:
        raise ConfigError(f"invalid config:\n  quant.init_from: {path} was calibrated for teacher {theirs!r}, this "
                          f"run's teacher is {run.source.path.name!r}")
    try:
        set_ranges(run.student, get_ranges(ckpt["model"]))
    except ActError as e:
        raise ConfigError(f"invalid config:\n  quant.init_from: {path}: {e}") from None


def calibrate_for_training(run, calibrator: str) -> Dict[str, Any]:
    """PTQ ranges to start distillation from (ptq.num_images images of the pool, no augmentation): one calibrator,
    or with 'search' each of auto.search, keeping the best by eval.metric if it is a fidelity key, else the task's
    fidelity mAP."""
    loader = calibration_loader(run)
    if calibrator == "search" and not run.eval_on:
        print("act: quant.calibrator search needs an evaluation to choose with (eval.fidelity or eval.data); "
              "using percentile")
        calibrator = "percentile"
    p = run.cfg.ptq
    if calibrator != "search":
        calibrate(run, loader, calibrator, p.percentile)
        return {"calibrator": calibrator, "percentile": p.percentile if calibrator == "percentile" else None,
                "images": len(loader.dataset)}
    metric = run.metric if run.metric and run.metric.startswith("fidelity") else (
        "fidelity_pose_map50_95" if run.task == "pose" else "fidelity_box_map50_95")
    print(f"act: calibrating: {len(run.cfg.auto.search)} PTQ calibrators on {len(loader.dataset)} images, the best "
          f"by {metric} starts distillation")
    best, tried = search(run, loader, run.cfg.auto.search, fidelity_score(metric),
                         on_result=lambda i, t: print(f"act:   {t.label}: {fmt_metrics(t.metrics)}"))
    if run.dist.enabled:  # every rank starts from rank 0's choice (the evaluations ran on rank 0 only)
        best = tried[run.dist.broadcast(tried.index(best))]
        set_ranges(run.student, run.dist.broadcast(best.result.ranges))
    print(f"act: calibrated with {best.label} ({metric} {best.metrics.get(metric, math.nan):.4f})")
    return {"calibrator": best.label, "metric": metric, "images": len(loader.dataset),
            "candidates": {t.label: round(t.metrics.get(metric, math.nan), 4) for t in tried}}
