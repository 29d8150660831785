"""`act frontier`: the accuracy-latency frontier of the knobs act has, made and measured.

    from act.orchestrate.frontier import Frontier
    result = Frontier("configs/yolo11n_pose_frontier.yaml").run()

Each point of `frontier:` (act.core.config.frontier) is made by the act run it stands for, in
<frontier dir>/points/<name>/, and measured the same way:

* the teacher at an input size in FP32: its ONNX at that size (no training);
* INT8 at an input size: `act ptq` or the config's distillation QAT with `data.imgsz` set (the exported model
  carries the size), partial quantization through `skip`;
* channel pruning to a MACs ratio (with or without a smaller input): the staged prune -> quant run of
  `frontier.prune_recipe` (or this config's stages); its FP32 point is that run's prune stage.

Measured per point (act.orchestrate.frontier_measure): MACs and parameters, batch-1 latency of its ONNX in every
installed runtime (OpenVINO CPU, onnxruntime CPU, TensorRT where present), label-free fidelity against the FP32
teacher at data.imgsz, and labeled mAP with eval.data. The Pareto points are marked (act.orchestrate.pareto), and
frontier.json, frontier.md (table, and the command that makes each point) and frontier.png (latency vs accuracy) are
written.

Stopping loses nothing: a point's run resumes from its own checkpoint, a measured point (point.json) is not measured
again (`remeasure`: True / "all" measures every point again, "latency" times them again only, e.g. on the
deployment machine after making the points on a GPU host with `make_only`, or on an idle machine). A point made elsewhere counts when its run folder (with the ONNX: `act export`) is put in its place.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import yaml
from torch import nn

from act.core.config import FrontierPoint, RunConfig, load_config, validate_config
from act.core.errors import ActError, ConfigError
from act.core.fileio import atomic_write_text
from act.run.runner import as_config

POINT_FILE = "point.json"


@dataclass
class Made:
    """A made point: its ONNX, the float module whose MACs it has, its run folder and the command that makes it."""

    onnx: Path
    float_model: nn.Module
    run_dir: Path
    command: str


def _flow(v: Any) -> str:
    """An override's value as the command line writes it (JSON is YAML flow style)."""
    return v if isinstance(v, str) else json.dumps(v)


def command_line(verb: str, config: Optional[str], overrides: Dict[str, Any]) -> str:
    args = ["act", verb, "--config", config or "CONFIG.yaml"] + [f"{k}={_flow(v)}" for k, v in overrides.items()]
    return " ".join(shlex.quote(a) for a in args)


class Frontier:
    """Makes and measures the points of `config.frontier`; `run()` returns {points, metric, runtime, ...}."""

    def __init__(self, config: Union[RunConfig, str, Path, Dict], overrides: Optional[List[str]] = None,
                 only: Sequence[str] = (), remeasure: Union[bool, str] = False, make_only: bool = False,
                 extra_points: Sequence[FrontierPoint] = (), log: Callable[[str], None] = print):
        self.cfg = as_config(config, overrides)
        self.config_path = str(config) if isinstance(config, (str, Path)) else None
        self.overrides = list(overrides or [])
        f = self.cfg.frontier
        self.base = self.cfg.data.imgsz
        self.out = Path(f.output_dir) if f.output_dir else Path(self.cfg.output_dir) / "frontier"
        self.remeasure, self.make_only, self.log = remeasure, make_only, log
        reference = FrontierPoint(imgsz=self.base, precision="fp32")
        points = [reference] + f.expand(self.base) + list(extra_points)
        seen: Dict[str, FrontierPoint] = {}
        for p in points:
            seen.setdefault(p.name, p)
        self.points = list(seen.values())
        self.all_points = list(self.points)  # a pruned FP32 point's INT8 twin may be outside --only
        self.reference = reference
        if only:
            unknown = sorted(set(only) - set(seen))
            if unknown:
                raise ConfigError(f"act frontier --only: no point named {unknown}; the points: {sorted(seen)}")
            self.points = [p for p in self.points if p.name in only or p.name == reference.name]
        self.points.sort(key=self._order)
        self._made: Dict[str, Made] = {}
        self._teacher = None

    # ---- what to make -------------------------------------------------------------------------------------------
    def _order(self, p: FrontierPoint) -> tuple:
        """The reference first, then the cheapest to make: FP32 exports, PTQ, QAT, pruning."""
        if p.name == self.reference.name:
            return (0,)
        kind = 1 if p.precision == "fp32" and p.prune == 1 else 2 if p.prune == 1 and p.int8 == "ptq" else \
            3 if p.prune == 1 else 4
        return (kind, -p.imgsz, -p.prune, p.name)

    def point_dir(self, p: FrontierPoint) -> Path:
        return self.out / "points" / p.name

    def teacher(self):
        if self._teacher is None:
            from act.run.build import load_teacher

            self._teacher = load_teacher(self.cfg)
        return self._teacher

    @staticmethod
    def _lean_eval(raw: Dict[str, Any], over: Dict[str, Any]) -> None:
        """A point's own run skips what the frontier measures anyway on its exported model: the teacher's evaluation
        before training, and labeled mAP during it where best.pt is picked by a label-free metric."""
        raw["eval"]["before"] = False
        over["eval.before"] = False
        metric = raw["eval"].get("metric") or ""
        if raw["eval"].get("data") and metric.startswith("fidelity"):
            raw["eval"]["data"] = None
            over["eval.data"] = None

    def _sub_raw(self, p: FrontierPoint) -> Dict[str, Any]:
        """The run config of an unpruned INT8 point: this config with data.imgsz, strategy and quant.skip set."""
        raw = self.cfg.dump()
        raw["data"]["imgsz"] = p.imgsz
        raw["eval"]["imgsz"] = None
        raw["strategy"] = p.int8
        raw["stages"] = None
        raw["quant"]["enabled"] = True
        if p.skip is not None:
            raw["quant"]["skip"] = p.skip
        raw["export"]["onnx"] = True
        raw["auto"].update(latency_ms=None, macs_ratio=None, max_drop=None)
        raw["frontier"] = {}
        raw["output_dir"] = str(self.point_dir(p))
        return raw

    def _prune_template(self) -> tuple:
        """(raw config the pruned points start from, its config file or None, stage list)."""
        f = self.cfg.frontier
        if f.prune_recipe:
            if not Path(f.prune_recipe).is_file():
                raise ConfigError(f"invalid config:\n  frontier.prune_recipe: file not found (got {f.prune_recipe!r})")
            recipe = load_config(f.prune_recipe)
            raw = recipe.dump()
            for key in ("teacher", "family", "task"):
                raw["model"][key] = getattr(self.cfg.model, key)
            raw["data"]["train"] = self.cfg.data.train
            raw["eval"]["data"] = self.cfg.eval.data
            raw["train"]["device"] = self.cfg.train.device
            stages = raw.get("stages") or [{"type": "prune"}, {"type": "quant"}]
            return raw, f.prune_recipe, stages
        raw = self.cfg.dump()
        stages = f.prune_stages or ([s for s in raw["stages"]] if raw.get("stages") and any(
            s.get("type") == "prune" for s in raw["stages"]) else [{"type": "prune"}, {"type": "quant"}])
        return raw, self.config_path, stages

    def _prune_raw(self, p: FrontierPoint, int8: bool) -> tuple:
        """(run config of a pruned point, the config file its command names, the overrides, the prune stage's
        index)."""
        raw, config_file, stages = self._prune_template()
        raw = copy.deepcopy(raw)
        stages = [dict(s) for s in stages]
        if not int8:
            stages = [s for s in stages if s.get("type") != "quant"]
        k = next(i for i, s in enumerate(stages) if s.get("type") == "prune")
        stages[k]["target"] = p.prune
        stages[k].setdefault("metric", "macs")
        if int8 and p.skip is not None:
            raw["quant"]["skip"] = p.skip
        raw.update(stages=stages, strategy="qat", output_dir=str(self.point_dir(p)), frontier={})
        raw["data"]["imgsz"] = p.imgsz
        raw["eval"]["imgsz"] = None
        raw["export"]["onnx"] = True
        raw["auto"].update(latency_ms=None, macs_ratio=None, max_drop=None, prune=None)
        over: Dict[str, Any] = {"data.imgsz": p.imgsz}
        if config_file == self.cfg.frontier.prune_recipe:  # the recipe, with this config's teacher and images
            over.update({"model.teacher": self.cfg.model.teacher, "data.train": self.cfg.data.train,
                         "eval.data": self.cfg.eval.data})
        over["stages"] = stages
        if int8 and p.skip is not None:
            over["quant.skip"] = p.skip
        self._lean_eval(raw, over)
        over["output_dir"] = str(self.point_dir(p))
        return raw, config_file, over, k

    def twin(self, p: FrontierPoint) -> Optional[FrontierPoint]:
        """The INT8 point whose prune stage is this FP32 pruned point (made once, used twice)."""
        if p.prune == 1 or p.precision != "fp32":
            return None
        for q in self.all_points:
            if q.precision == "int8" and q.imgsz == p.imgsz and q.prune == p.prune and q.int8 == "qat" and \
                    q.skip is None:
                return q
        return None

    def point_config(self, p: FrontierPoint) -> Optional[RunConfig]:
        """The validated run config that makes `p` (None: the teacher's own export)."""
        if p.prune == 1 and p.precision == "fp32":
            return None
        if p.prune == 1:
            return validate_config(self._sub_raw(p))
        return validate_config(self._prune_raw(p, p.precision == "int8")[0])

    def check_points(self) -> None:
        """Every point's run config validated before any point is made: a bad one fails now, naming the point."""
        for p in self.points:
            try:
                self.point_config(p)
            except ConfigError as e:
                raise ConfigError(f"frontier point {p.name}: {e}") from None

    # ---- making -------------------------------------------------------------------------------------------------
    def make(self, p: FrontierPoint) -> Made:
        if p.name in self._made:
            return self._made[p.name]
        d = self.point_dir(p)
        teacher, family, src = self.teacher()
        if p.prune == 1 and p.precision == "fp32":
            from act.deploy.export import export_onnx

            onnx = d / "model.onnx"
            if not onnx.is_file():
                export_onnx(teacher, onnx, family, p.imgsz, 1, self.cfg.export.opset)
            made = Made(onnx, teacher, d, f"yolo export model={src.path} format=onnx imgsz={p.imgsz} "
                                          f"opset={self.cfg.export.opset}")
        elif p.prune == 1:
            made = self._make_int8(p)
        else:
            made = self._make_pruned(p)
        self._made[p.name] = made
        return made

    def _make_int8(self, p: FrontierPoint) -> Made:
        d = self.point_dir(p)
        raw = self._sub_raw(p)
        over: Dict[str, Any] = {"data.imgsz": p.imgsz}
        if p.int8 == "qat":
            over["strategy"] = "qat"
        if p.skip is not None:
            over["quant.skip"] = p.skip
        self._lean_eval(raw, over)
        over["output_dir"] = str(d)
        verb = "ptq" if p.int8 == "ptq" else "compress"
        command = command_line(verb, self.config_path, {**_as_overrides(self.overrides), **over})
        if not _finished(d):
            self.log(f"act frontier: making {p.name}: {command}")
            cfg = validate_config(raw)
            from act.orchestrate.analyze import AutoSkip

            if p.int8 == "ptq":
                from act.run.ptq import PostTrainingQuantization

                PostTrainingQuantization(cfg, hooks=[AutoSkip()]).run(exist_ok=True)
            else:
                from act.run.trainer import Trainer

                Trainer(cfg, hooks=[AutoSkip()]).run(resume=(d / "last.pt").is_file(), exist_ok=True)
        return Made(_onnx_of(d), self.teacher()[0], d, command)

    def _make_pruned(self, p: FrontierPoint) -> Made:
        from act.blocks.checkpoint import load_checkpoint
        from act.orchestrate.staged_run import StagedRun, stage_dir

        twin = self.twin(p)
        if twin is not None:
            made = self.make(twin)
            raw, _, _, k = self._prune_raw(twin, True)
            cfg = validate_config(raw)
            stage = stage_dir(made.run_dir, k, cfg.stages[k])
            return Made(_onnx_of(stage), _float_module(load_checkpoint(stage / "best.pt")), stage,
                        made.command + f"   # its stage {stage.name}")
        d = self.point_dir(p)
        raw, config_file, over, k = self._prune_raw(p, p.precision == "int8")
        command = command_line("compress", config_file, {**(_as_overrides(self.overrides) if config_file ==
                                                            self.config_path else {}), **over})
        cfg = validate_config(raw)
        if not _finished(d):
            self.log(f"act frontier: making {p.name}: {command}")
            StagedRun(cfg).run(resume=(d / "stages.json").is_file(), exist_ok=True)
        stage = stage_dir(d, k, cfg.stages[k])
        structure = stage / "best.pt" if (stage / "best.pt").is_file() else d / "best.pt"  # its MACs: the same
        return Made(_onnx_of(d), _float_module(load_checkpoint(structure)), d, command)

    # ---- the whole frontier ---------------------------------------------------------------------------------------
    def run(self, skip: Optional[Callable[[FrontierPoint, List[Dict[str, Any]]], Optional[str]]] = None
            ) -> Dict[str, Any]:
        """Make and measure every point (skip(point, rows so far) -> a reason leaves a point out), then write the
        frontier files. Returns {points, metric, runtime, teacher, files}."""
        from tqdm import tqdm

        from act.orchestrate.frontier_measure import Measurer
        from act.orchestrate.frontier_report import frontier_table, write_frontier
        from act.run.build import check_inputs

        check_inputs(self.cfg)
        self.check_points()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.dump(), sort_keys=False))
        measurer = None if self.make_only else Measurer(self.cfg, self.teacher(), self.log)
        rows: List[Dict[str, Any]] = []
        skipped: List[Dict[str, Any]] = []
        t0 = time.time()
        bar = tqdm(self.points, desc="act frontier", unit="point", dynamic_ncols=True,
                   disable=os.environ.get("ACT_NO_PROGRESS") == "1")
        for p in bar:
            bar.set_postfix_str(p.name)
            why = skip(p, rows) if skip and p.name != self.reference.name else None  # the reference: always
            if why:
                self.log(f"act frontier: {p.name}: not made ({why})")
                skipped.append({"name": p.name, "why": why, **p.model_dump(mode="json")})
                continue
            made = self.make(p)
            if measurer is None:
                continue
            file = self.point_dir(p) / POINT_FILE
            if file.is_file() and self.remeasure == "latency":
                row = measurer.remeasure_latency(json.loads(file.read_text()), made)
                atomic_write_text(file, json.dumps(row, indent=2, default=str))
            elif file.is_file() and not self.remeasure:
                row = json.loads(file.read_text())
            else:
                row = measurer.measure(p, made, reference=rows[0] if rows else None)
                file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(file, json.dumps(row, indent=2, default=str))
            rows.append(row)
            self.log(f"act frontier: {p.name}: " + measurer.describe(row))
        bar.close()
        if measurer is None:
            return {"points": [], "made": [p.name for p in self.points], "out": str(self.out)}
        result = measurer.summarize(rows)
        result.update(skipped=skipped, time_s=round(time.time() - t0, 1), out=str(self.out),
                      config=self.config_path, overrides=self.overrides)
        result["files"] = write_frontier(result, self.out)
        self.log(frontier_table(result))
        self.log(f"act frontier: wrote {result['files']['md']} and {result['files']['png']}")
        return result


# ---- helpers ------------------------------------------------------------------------------------------------------
def _as_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """The command-line overrides a point's own run takes (not those of the frontier or auto's budget)."""
    out: Dict[str, Any] = {}
    for it in items:
        k, _, v = it.partition("=")
        if not k.strip().startswith(("frontier.", "auto.", "output_dir")):
            out[k.strip()] = v
    return out


def _finished(d: Path) -> bool:
    """A run that finished here (summary.json), or one made elsewhere whose ONNX was written (`act export`)."""
    return (d / "summary.json").is_file() or (d / "student.onnx").is_file()


def _onnx_of(d: Path) -> Path:
    """The run's exported ONNX (student.onnx, from its summary when it names one)."""
    onnx = d / "student.onnx"
    try:
        named = json.loads((d / "summary.json").read_text()).get("onnx", {}).get("path")
    except (OSError, ValueError):
        named = None
    if named and Path(named).is_file():
        onnx = Path(named)
    if not onnx.is_file():
        raise ActError(f"{d}: a finished run without its ONNX (made with export.onnx: false?); write it with "
                       f"`act export {d}`, then run act frontier again")
    return onnx


def _float_module(ckpt: Dict[str, Any]) -> nn.Module:
    return ckpt["model"].float().eval()


def load_frontier(path: Union[str, Path]) -> Dict[str, Any]:
    """A written frontier.json (a folder holding one, or the file)."""
    p = Path(path)
    p = p / "frontier.json" if p.is_dir() else p
    if not p.is_file():
        raise ActError(f"no frontier.json at {path}")
    return json.loads(p.read_text())

