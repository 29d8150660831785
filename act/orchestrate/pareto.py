"""The frontier's decisions, on measured points: which points are Pareto-optimal (no other point is at least as fast
and at least as accurate, and better in one), and which point a budget picks.

A point here is a dict with `name`, `accuracy` (higher is better), `drop` (the teacher's accuracy minus its own),
`cost` (the ranking cost: latency in ms in the ranking runtime, or the MACs ratio where no latency was measured) and
`macs_ratio`. `choose` never picks a dominated point: of the points within the budget it takes the most accurate, and
on a tie the cheapest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


def dominated_by(p: Dict[str, Any], points: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A point at least as cheap and at least as accurate as `p`, and better in one; None if there is none."""
    for q in points:
        if q is p or q["cost"] is None or p["cost"] is None:
            continue
        if q["cost"] <= p["cost"] and q["accuracy"] >= p["accuracy"] and (
                q["cost"] < p["cost"] or q["accuracy"] > p["accuracy"]):
            return q
    return None


def mark_pareto(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Sets `pareto` (True / False) and `dominated_by` (a name or None) on every point with an accuracy."""
    scored = [p for p in points if p.get("accuracy") is not None and p.get("cost") is not None]
    for p in points:
        q = dominated_by(p, scored) if p in scored else None
        p["pareto"] = p in scored and q is None
        p["dominated_by"] = q["name"] if q else None
    return points


@dataclass
class Budget:
    latency_ms: Optional[float] = None
    macs_ratio: Optional[float] = None
    max_drop: Optional[float] = None
    runtime: str = "openvino"

    def misses(self, p: Dict[str, Any]) -> List[str]:
        """Why `p` is outside the budget (empty: within it)."""
        why = []
        if self.latency_ms is not None:
            ms = p.get("latency_ms")
            if ms is None:
                why.append(f"no {self.runtime} latency measured")
            elif ms > self.latency_ms:
                why.append(f"{ms:.1f} ms > {self.latency_ms:g} ms")
        if self.macs_ratio is not None and p["macs_ratio"] > self.macs_ratio + 1e-9:
            why.append(f"{p['macs_ratio']:.3f}x MACs > {self.macs_ratio:g}x")
        return why

    def describe(self) -> str:
        parts = []
        if self.latency_ms is not None:
            parts.append(f"{self.runtime} latency <= {self.latency_ms:g} ms")
        if self.macs_ratio is not None:
            parts.append(f"MACs <= {self.macs_ratio:g}x the teacher's")
        if self.max_drop is not None:
            parts.append(f"accuracy drop <= {self.max_drop:g}")
        return ", ".join(parts)


@dataclass
class Choice:
    chosen: Optional[Dict[str, Any]]
    met: bool
    reasons: List[str] = field(default_factory=list)  # one line per point: chosen, or why not
    closest: List[Dict[str, Any]] = field(default_factory=list)  # when unmet: the nearest points either way


def _line(p: Dict[str, Any], metric: str) -> str:
    ms = p.get("latency_ms")
    cost = f"{ms:.1f} ms" if ms is not None else "latency not measured"
    return (f"{p['name']}: {metric} {p['accuracy']:.4f} ({-p['drop'] * 100 + 0.0:+.1f} points), {p['macs_ratio']:.2f}x MACs, "
            f"{cost}" + (f" ({p['latency_ratio']:.2f}x the teacher)" if p.get("latency_ratio") else ""))


def choose(points: Sequence[Dict[str, Any]], budget: Budget, metric: str) -> Choice:
    """The most accurate point within the budget (ties: the cheaper); every other point with why it was not chosen.
    Unmet (nothing within the budget, or the best of them loses more than max_drop): chosen is None and `closest`
    holds the most accurate point within the budget (if any) and the cheapest point within max_drop (if any)."""
    scored = [p for p in points if p.get("accuracy") is not None]
    within = [p for p in scored if not budget.misses(p)]
    best = max(within, key=lambda p: (p["accuracy"], -(p["cost"] if p["cost"] is not None else 0)), default=None)
    reasons: List[str] = []
    met = best is not None and (budget.max_drop is None or best["drop"] <= budget.max_drop + 1e-12)
    for p in sorted(scored, key=lambda p: -p["accuracy"]):
        if p is best and met:
            reasons.append(f"chosen: {_line(p, metric)}: the most accurate point within {budget.describe()}")
            continue
        miss = budget.misses(p)
        if miss:
            why = "outside the budget: " + "; ".join(miss)
        elif budget.max_drop is not None and p["drop"] > budget.max_drop + 1e-12:
            why = f"loses {p['drop'] * 100:.1f} points > max_drop {budget.max_drop:g} ({budget.max_drop * 100:.1f} points)"
        else:
            why = f"less accurate than {best['name']}" if best is not None else "not chosen"
        dom = p.get("dominated_by")
        reasons.append(f"not chosen: {_line(p, metric)}: {why}" + (f" (dominated by {dom})" if dom else ""))
    closest: List[Dict[str, Any]] = []
    if not met:
        if best is not None:
            closest.append(best)
        ok = [p for p in scored if budget.max_drop is None or p["drop"] <= budget.max_drop + 1e-12]
        cheapest = min((p for p in ok if p["cost"] is not None), key=lambda p: p["cost"], default=None)
        if cheapest is not None and cheapest not in closest:
            closest.append(cheapest)
    return Choice(best if met else None, met, reasons, closest)


def unmet_message(choice: Choice, budget: Budget, metric: str) -> str:
    lines = [f"no point of the frontier meets {budget.describe()}; the closest:"]
    if not choice.closest:
        lines.append("  (no point was measured)")
    for p in choice.closest:
        miss = budget.misses(p)
        what = "within the budget, but loses too much" if not miss else "accurate enough, but " + "; ".join(miss)
        lines.append(f"  {_line(p, metric)}: {what}")
    lines.append("relax auto.latency_ms / auto.macs_ratio / auto.max_drop, or add points (frontier: imgsz, prune)")
    return "\n".join(lines)
