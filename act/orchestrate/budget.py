"""`strategy: auto` with a budget (`auto.latency_ms` and/or `auto.macs_ratio`, optionally `auto.max_drop`): the
most accurate way to meet it, picked from a measured frontier (act.orchestrate.frontier).

1. The frontier of `frontier:` is made and measured in <output_dir>/frontier (resumable), leaving out what cannot
   meet the budget before paying for it: a point that aims above auto.macs_ratio, and a QAT point whose PTQ twin
   (the same graph, made in minutes and added for this) already runs slower than auto.latency_ms.
2. Of the measured points within the budget, the most accurate is chosen (never a dominated one); every other point
   is logged with why it was not (act.orchestrate.pareto), in the log, summary.json["decisions"] and report.md.
3. The chosen point's deliverables (its ONNX as student.onnx, its checkpoint, its OpenVINO IR) are copied into
   output_dir, with this run's frontier.json / .md / .png (the budget and the decisions in them) and report.md. A budget nothing meets within auto.max_drop fails (exit 6) naming the closest points either way.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from act.core.config import FrontierPoint, RunConfig
from act.core.errors import ActError, ConfigError
from act.core.fileio import atomic_write_bytes, atomic_write_text
from act.orchestrate.frontier import Frontier
from act.orchestrate.frontier_measure import ranking_runtime
from act.orchestrate.frontier_report import frontier_markdown, write_frontier
from act.orchestrate.pareto import Budget, choose, unmet_message

MACS_SLACK = 0.02  # a pruning target lands on a channel-count staircase: aim may sit this far above the result


class BudgetUnmet(ActError):
    """No point of the frontier meets the budget."""

    exit_code = 6


def budget_of(cfg: RunConfig) -> Budget:
    a = cfg.auto
    return Budget(a.latency_ms, a.macs_ratio, a.max_drop, ranking_runtime(cfg.frontier.runtime))


def ptq_twins(points: List[FrontierPoint]) -> List[FrontierPoint]:
    """For each unpruned QAT point, the PTQ point of the same graph (input size, skip): its latency screens the QAT
    point before any training."""
    return [p.model_copy(update={"int8": "ptq"}) for p in points
            if p.precision == "int8" and p.int8 == "qat" and p.prune == 1]


class BudgetStrategy:
    def __init__(self, config: RunConfig, train_loader=None, eval_fn=None):
        if train_loader is not None or eval_fn is not None:
            raise ConfigError("invalid config:\n  auto.latency_ms / auto.macs_ratio: a budget run makes every point "
                              "from the config (data.train, eval); a script's train_loader / eval_fn are not used "
                              "there: pass none, or use strategy: qat")
        self.cfg = config
        self.out = Path(config.output_dir)
        self.budget = budget_of(config)
        self.decisions: List[str] = []

    def screen(self, p: FrontierPoint, rows: List[Dict[str, Any]]) -> Optional[str]:
        """Why `p` cannot meet the budget, known before making it; None: make it."""
        b, base = self.budget, self.cfg.data.imgsz
        if b.macs_ratio is not None and p.macs_ratio(base) > b.macs_ratio + MACS_SLACK:
            return f"aims at {p.macs_ratio(base):.2f}x MACs > budget {b.macs_ratio:g}x"
        if b.latency_ms is not None and p.precision == "int8" and p.int8 == "qat" and p.prune == 1:
            twin = p.model_copy(update={"int8": "ptq"}).name
            for r in rows:
                if r["name"] == twin:
                    ms = (r.get("latency", {}).get(b.runtime) or {}).get("median_ms")
                    if ms is not None and ms > b.latency_ms:
                        return f"its PTQ twin {twin} (the same graph) runs {ms:.1f} ms > budget {b.latency_ms:g} ms"
        return None

    def check_output(self, exist_ok: bool) -> None:
        """output_dir may hold a budget run (this one, run again) but not another kind of run, unless exist_ok."""
        sj = self.out / "summary.json"
        if not exist_ok and sj.is_file():
            try:
                mode = json.loads(sj.read_text()).get("mode")
            except ValueError:
                mode = None
            if mode != "budget":
                raise ConfigError(f"invalid config:\n  output_dir: {self.out} holds another run (mode {mode!r}); "
                                  f"choose another output_dir or pass --exist-ok")

    def run(self, resume: bool = False, exist_ok: bool = False) -> Dict[str, Any]:
        """Measure (or resume) the frontier, choose, deliver. `resume` changes nothing: the frontier always resumes."""
        cfg, b = self.cfg, self.budget
        self.check_output(exist_ok)
        t0 = time.time()
        print(f"act: strategy auto with a budget: {b.describe()}; measuring the frontier")
        base_points = cfg.frontier.expand(cfg.data.imgsz)
        twins = ptq_twins(base_points) if b.latency_ms is not None else []
        frontier = Frontier(cfg, extra_points=twins)
        result = frontier.run(skip=self.screen)
        choice = choose(result["points"], b, result["metric"])
        for line in choice.reasons:
            print(f"act: decision [budget]: {line}")
        skipped = [f"not made: {s['name']}: {s['why']}" for s in result.get("skipped", [])]
        for line in skipped:
            print(f"act: decision [budget]: {line}")
        self.decisions = choice.reasons + skipped
        result["decisions"] = self.decisions
        result["budget"] = {"latency_ms": b.latency_ms, "macs_ratio": b.macs_ratio, "max_drop": b.max_drop,
                            "runtime": b.runtime}
        self.out.mkdir(parents=True, exist_ok=True)
        result["files"] = write_frontier(result, self.out)  # this run's copy, with its budget and decisions
        summary: Dict[str, Any] = {
            "mode": "budget", "strategy": {"name": "auto", "budget": result["budget"]},
            "met": choice.met, "metric": result["metric"], "teacher": result["teacher"],
            "decisions": self.decisions, "frontier": result["files"], "time_s": {"total": round(time.time() - t0, 1)},
        }
        if not choice.met:
            summary["closest"] = [p["name"] for p in choice.closest]
            self._write(summary, result)
            raise BudgetUnmet(unmet_message(choice, b, result["metric"]))
        chosen = choice.chosen
        summary["chosen"] = {k: chosen.get(k) for k in ("name", "imgsz", "prune", "precision", "int8", "skip",
                                                        "macs_ratio", "latency_ms", "latency_ratio", "accuracy",
                                                        "drop", "metrics", "latency", "command", "run_dir")}
        summary["onnx"] = {"path": str(self._deliver(chosen))}
        self._write(summary, result)
        print(f"act: done: {chosen['name']} -> {summary['onnx']['path']} ({result['metric']} "
              f"{chosen['accuracy']:.4f}, {-chosen['drop'] * 100 + 0.0:+.1f} points vs the teacher)")
        return summary

    def _deliver(self, chosen: Dict[str, Any]) -> Path:
        """The chosen point's ONNX as output_dir/student.onnx, with its OpenVINO IR and checkpoint when it has them."""
        onnx = Path(chosen["onnx"])
        target = atomic_write_bytes(self.out / "student.onnx", onnx.read_bytes(), what="ONNX file")
        ir = onnx.parent / f"{onnx.stem}_openvino_model"
        if ir.is_dir():
            dest = self.out / "student_openvino_model"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ir, dest)
        run_dir = Path(chosen["run_dir"])
        for name, as_name in (("best.pt", "best.pt"), ("ptq.pt", "ptq.pt"), ("config.yaml", "chosen_config.yaml")):
            if (run_dir / name).is_file():
                atomic_write_bytes(self.out / as_name, (run_dir / name).read_bytes(), what=as_name)
        return target

    def _write(self, summary: Dict[str, Any], result: Dict[str, Any]) -> None:
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
        atomic_write_text(self.out / "decisions.json", json.dumps(self.decisions, indent=2))
        write_budget_report(self.out, summary, result, self.budget.describe())


def write_budget_report(out: Path, summary: Optional[Dict[str, Any]] = None, result: Optional[Dict[str, Any]] = None,
                        budget: Optional[str] = None) -> Path:
    """report.md of a budget run: the budget, the choice, the frontier table and plot, every decision (`act report`
    rewrites it from summary.json and the frontier's frontier.json)."""
    from act.orchestrate.frontier import load_frontier

    out = Path(out)
    summary = summary or json.loads((out / "summary.json").read_text())
    result = result or load_frontier(summary["frontier"]["json"])
    if budget is None:
        b = summary["strategy"]["budget"]
        budget = Budget(b["latency_ms"], b["macs_ratio"], b["max_drop"], b["runtime"]).describe()
    head = (f"# act: strategy auto with a budget\n\nBudget: {budget}. "
            + (f"Chosen: **{summary['chosen']['name']}** -> `{summary['onnx']['path']}`.\n\n" if summary["met"]
               else "**Not met**: no point is within it" + (f" (closest: {', '.join(summary['closest'])})"
                                                             if summary.get("closest") else "") + ".\n\n"))
    path = out / "report.md"  # beside this run's frontier.png, which the table's markdown shows
    atomic_write_text(path, head + frontier_markdown(result).split("\n", 1)[1])
    return path
