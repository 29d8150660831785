"""Targets: when is a student good enough? `check_target(target, results, teacher_results, task)`.

A target (act.core.config.TargetConfig) names a metric (any key of the eval results; 'auto' = the label-free detection
fidelity mAP of the task) and an absolute bound `min` and/or a relative one `max_drop` (at most that far below the
teacher's value). Label-free fidelity keys compare the student with the teacher, whose own value is 1.0 (mAP,
cosine); a `max_drop` on an SNR (the teacher's is infinite) is refused.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from act.core.errors import ConfigError

TEACHER_FIDELITY = 1.0  # fidelity mAP / cosine of the teacher against itself


def target_metric(target, task: str) -> str:
    if target.metric != "auto":
        return target.metric
    return "fidelity_pose_map50_95" if task == "pose" else "fidelity_box_map50_95"


def teacher_value(metric: str, teacher_results: Optional[Dict[str, float]]) -> Optional[float]:
    if "snr" in metric:
        return math.inf
    if metric.startswith("fidelity") or metric in ("cos_min", "fidelity_map"):
        return TEACHER_FIDELITY
    return (teacher_results or {}).get(metric)


def threshold(target, task: str, teacher_results: Optional[Dict[str, float]], where: str = "target") -> float:
    """The value the metric must reach (the stricter of min and teacher - max_drop)."""
    metric = target_metric(target, task)
    bounds = []
    if target.min is not None:
        bounds.append(float(target.min))
    if target.max_drop is not None:
        tv = teacher_value(metric, teacher_results)
        if tv is None:
            raise ConfigError(f"invalid config:\n  {where}.max_drop: needs the teacher's {metric!r}, but the teacher's "
                              f"evaluation has no such key (set eval.data / eval.before: true, or use min)")
        if math.isinf(tv):
            raise ConfigError(f"invalid config:\n  {where}.max_drop: {metric!r} has no finite teacher value; use min")
        bounds.append(tv - float(target.max_drop))
    return max(bounds)


def check_target(target, results: Dict[str, float], teacher_results: Optional[Dict[str, float]], task: str,
                 where: str = "target") -> Tuple[bool, Dict[str, Any]]:
    """(met, {metric, value, threshold, met}); a missing metric is a config error naming the available keys."""
    metric = target_metric(target, task)
    if metric not in results:
        raise ConfigError(f"invalid config:\n  {where}.metric: {metric!r} is not among the eval results "
                          f"{sorted(k for k in results if '/' not in k)}")
    thr = threshold(target, task, teacher_results, where)
    value = float(results[metric])
    met = not math.isnan(value) and value >= thr
    return met, {"metric": metric, "value": value, "threshold": thr, "met": met}
