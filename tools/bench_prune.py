#!/usr/bin/env python
"""Pruning benchmark: the FP32 teacher and configs/yolo11n_pose_prune_qat.yaml at one or more MACs targets (the
frontier), for yolo11n-pose on coco-pose-mini (train split = the unlabeled pool, val split = the 500 labeled images).
Each target is one `act compress` of the recipe with `stages.0.target=T` (prune stage, then quant stage), run as a user
runs it, in its own process, `--parallel` at a time; each makes a pruned FP32 row and a pruned + INT8 row.

    python tools/bench_prune.py --data ../shared/data/coco-pose-mini --out results/prune --target 0.8   # one GPU
    python tools/bench_prune.py --data ... --out results/frontier --targets 0.9 0.8 0.7 0.6 --parallel 2 --onnx-rows
    python tools/bench_prune.py --out /tmp/bench_prune --quick                                        # CPU smoke run

Iterations, steps and learning rates are the recipe's unless a flag or --set changes them (the table says which).
Columns: pose / box mAP (Ultralytics validators on val, square letterbox, the same code as `act eval` and
tools/benchmark.py), label-free fidelity vs the teacher on the held-out train slice, MACs and parameters at imgsz
(torch-pruning's counter), onnxruntime CPU latency of each row's ONNX (batch 1, median of --latency-runs, measured
here one model at a time after the runs; the INT8 row's ONNX is the Q/DQ model). The compressed rows evaluate best.pt
in torch (the fake-quantized student for INT8); --onnx-rows adds the INT8 ONNX evaluated in onnxruntime.
For pruning against the other knobs (input size, INT8 by PTQ / QAT, both at once) with OpenVINO latency, see
`act frontier` (docs/frontier.md). A run that ends unfinished still gives the rows of the stages it finished; when this script itself is stopped (a
device call's time limit), --resume continues each run with act's own --resume, then evaluates.
Writes OUT/bench_prune.md and OUT/bench_prune.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = [
    ("method", "method"),
    ("pose_map50_95", "pose mAP50-95"),
    ("pose_map50", "pose mAP50"),
    ("box_map50_95", "box mAP50-95"),
    ("fidelity_pose_map50_95", "fidelity pose mAP (vs teacher)"),
    ("gmacs", "GMACs"),
    ("macs_ratio", "MACs vs teacher"),
    ("mparams", "params (M)"),
    ("ort_cpu_ms", "ORT CPU ms (b1)"),
    ("compress_s", "compression wall s"),
]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("act_benchmark", ROOT / "tools" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="coco-pose-mini folder (or its data.yaml); default: "
                                                "../shared/data/coco-pose-mini, else ./shared/data/coco-pose-mini")
    p.add_argument("--out", default="results/prune", help="output folder for the table, the JSON and the run")
    p.add_argument("--config", default=str(ROOT / "configs/yolo11n_pose_prune_qat.yaml"), help="staged recipe")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: imgsz 160, a few images and iterations")
    p.add_argument("--device", default=None, help="default: auto (CUDA if available); --quick: cpu")
    p.add_argument("--imgsz", type=int, default=None, help="default 640 (--quick 160)")
    p.add_argument("--target", type=float, default=0.6, help="share of the teacher's MACs to keep (default 0.6)")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="several targets, one staged run each (the frontier table); overrides --target")
    p.add_argument("--parallel", type=int, default=1, help="staged runs at once on the device (default 1)")
    p.add_argument("--scope", choices=["uniform", "global"], default=None, help="default: the recipe's")
    p.add_argument("--importance", choices=["l1", "l2", "group_norm", "lamp", "taylor"], default=None,
                   help="default: the recipe's")
    p.add_argument("--prune-iters", type=int, default=None, help="prune stage iterations, pruning steps included "
                                                                 "(default: the recipe's; --quick 4)")
    p.add_argument("--prune-steps", type=int, default=None, help="pruning steps (default: the recipe's; --quick 2)")
    p.add_argument("--step-iters", type=int, default=None, help="distillation iterations between pruning steps "
                                                                "(default: the recipe's; --quick 2)")
    p.add_argument("--prune-lr", type=float, default=None, help="prune stage learning rate (default: the recipe's)")
    p.add_argument("--quant-iters", type=int, default=None, help="quant stage iterations (default: the recipe's; "
                                                                 "--quick 2)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the recipe's; --quick 2)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: the recipe's; quick 0)")
    p.add_argument("--eval-batch", type=int, default=None, help="default 32 (--quick 8)")
    p.add_argument("--max-images", type=int, default=None, help="val images (default all; --quick 8)")
    p.add_argument("--fidelity-images", type=int, default=None, help="held-out unlabeled images (default 64; quick 8)")
    p.add_argument("--latency-runs", type=int, default=None, help="onnxruntime CPU runs per model (default 50; "
                                                                  "--quick 3)")
    p.add_argument("--onnx-rows", action="store_true", help="also evaluate the exported ONNX files (onnxruntime)")
    p.add_argument("--onnx-max-images", type=int, default=None, help="val images for the ONNX rows")
    p.add_argument("--onnx-device", default="cpu", help="device for onnxruntime rows (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue each staged run in OUT/runs/prune_qat_T (act's "
                                                         "own --resume: finished stages are kept), then evaluate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the staged run, e.g. distill.losses.kpt.weighting=teacher_score "
                        "(repeatable)")
    return p.parse_args(argv)


class PruneBench:
    def __init__(self, args):
        bm = _benchmark_module()
        q = args.quick
        # the accuracy benchmark's settings object: same data resolution, eval and output conventions
        base_args = bm.parse_args([] + (["--quick"] if q else []))
        for k in ("data", "out", "device", "imgsz", "eval_batch", "max_images", "onnx_max_images", "onnx_device",
                  "fidelity_images", "workers"):
            setattr(base_args, k, getattr(args, k))
        self.b = bm.Bench(base_args)
        self.bm = bm
        self.args = args
        self.out = self.b.out
        self.rows: List[Dict] = []
        self.latency_runs = args.latency_runs or (3 if q else 50)
        self.runs: Dict[float, Dict] = {}
        self.stages: List[Dict] = _read_yaml(args.config)["stages"]  # the recipe's, read once
        self.t0 = time.time()

    # ---- rows ----------------------------------------------------------------------------------------------------
    def teacher_row(self):
        from act.run.build import load_frozen
        from act.deploy.export import export_onnx
        from act.deploy.latency import ort_latency
        from act.blocks.prune import model_cost

        r = self.b.evaluate(self.b.teacher)
        model, family, _ = load_frozen(self.b.teacher)
        macs, params = model_cost(model, self.b.imgsz)
        onnx = export_onnx(model, self.out / "teacher_fp32.onnx", family, self.b.imgsz)
        lat = ort_latency(onnx, runs=self.latency_runs)
        self.teacher_macs = macs
        return {**r, "model": self.b.teacher, **self._cost(macs, params), "ort_cpu_ms": lat["median_ms"],
                "latency": lat, "macs_ratio": 1.0}

    def _cost(self, macs, params):
        return {"gmacs": round(macs / 1e9, 3), "mparams": round(params / 1e6, 3), "macs": macs, "params": params}

    @staticmethod
    def run_name(target: float) -> str:
        return f"prune_qat_{target:g}"

    def stage_indices(self):
        types = [st["type"] for st in self.stages]
        if "prune" not in types or "quant" not in types:
            raise SystemExit(f"bench_prune: {self.args.config} needs a prune stage and a quant stage")
        return types.index("prune"), types.index("quant")

    def run_overrides(self, target: float) -> List[str]:
        """The config overrides of one target's run: data, device and output from the benchmark settings, then
        `recipe_overrides`."""
        return self.b.common(self.run_name(target)) + self.recipe_overrides(target)

    def recipe_overrides(self, target: float) -> List[str]:
        """What changes the recipe itself: the target; the iteration flags only where given (else the recipe's own
        values); --quick's tiny settings; the device's share of data workers; then --set."""
        a, q = self.args, self.args.quick
        pi, qi = self.stage_indices()
        o = [f"stages.{pi}.target={target}"]
        given = {f"stages.{pi}.steps": a.prune_steps or (2 if q else None),
                 f"stages.{pi}.step_iterations": a.step_iters or (2 if q else None),
                 f"stages.{pi}.train.iterations": a.prune_iters or (4 if q else None),
                 f"stages.{pi}.train.lr": a.prune_lr, f"stages.{pi}.scope": a.scope,
                 f"stages.{pi}.importance": a.importance,
                 f"stages.{qi}.train.iterations": a.quant_iters or (2 if q else None),
                 "data.batch_size": a.batch or (2 if q else None)}
        o += [f"{k}={v}" for k, v in given.items() if v is not None]
        if q:
            o += ["eval.every=4", "export.parity_images=2", "export.latency_runs=1", "train.log_every=1",
                  "quant.calib_batches=2", "ptq.num_images=8", "ptq.batch_size=4", "ptq.bins=512"]
        if a.parallel > 1 and a.workers is None and not q:
            o.append(f"data.workers={max(2, (os.cpu_count() or 4) // (2 * a.parallel))}")
        return o + list(a.set)

    def run_all(self, targets: List[float]) -> Dict[float, Dict]:
        """`act compress` of the recipe for each target, `--parallel` at a time, each in its own process. Returns
        target -> {"rc", "wall_s", "log"}; the rows come from the stage folders the run finished."""
        jobs = {}
        for t in targets:
            resume = self.args.resume and (self.out / "runs" / self.run_name(t) / "stages.json").is_file()
            cmd = [sys.executable, "-m", "act", "compress", "--config", self.args.config, "--exist-ok",
                   *(["--resume"] if resume else []), *self.run_overrides(t)]
            jobs[t] = (cmd, self.out / "runs" / f"{self.run_name(t)}.log", self.run_name(t))
        return self.bm.run_processes(jobs, self.args.parallel, "bench_prune")

    def stage_dir(self, target: float, index: int) -> Path:
        st = self.stages[index]
        return self.out / "runs" / self.run_name(target) / "stages" / f"{index + 1}_{st.get('name', st['type'])}"

    def stage_row(self, target: float, index: int, onnx: bool = False):
        """One stage's student: its best.pt in torch (or, onnx, its exported ONNX in onnxruntime), its cost from the
        stage's summary, the onnxruntime CPU latency of its ONNX measured now (one model at a time)."""
        from act.deploy.latency import ort_latency

        d = self.stage_dir(target, index)
        if not (d / "summary.json").is_file():
            run = self.runs.get(target, {})
            raise RuntimeError(f"the stage did not finish (act compress exit {run.get('rc')}; log {run.get('log')})")
        s = json.loads((d / "summary.json").read_text())
        model = Path(s["onnx"]["path"]) if onnx else d / "best.pt"
        r = (self.b.evaluate(str(model), max_images=self.args.onnx_max_images, device=self.args.onnx_device) if onnx
             else self.b.evaluate(str(model)))
        c = s["cost"]
        lat = ort_latency(Path(s["onnx"]["path"]), runs=self.latency_runs)
        return {**r, "model": str(model), **self._cost(c["macs"], c["params"]), "macs_ratio": c["macs_ratio"],
                "ort_cpu_ms": lat["median_ms"], "latency": lat, "iterations": s["iterations"],
                "best_iteration": s.get("best_iteration"), "compress_s": s["time_s"].get("compress"),
                "prune_steps": s["stage"].get("prune_steps"), "parity": s["onnx"].get("parity")}

    # ---- output --------------------------------------------------------------------------------------------------
    def add(self, method, fn) -> Dict:
        row = self.bm.run_row(method, fn, "bench_prune")
        self.rows.append(row)
        self.write()
        self.bm._free()
        return row

    def changes(self) -> List[str]:
        """The flags and --set options that changed the recipe (besides the target)."""
        a = self.args
        flags = {"--quick": a.quick or None, "--prune-steps": a.prune_steps, "--step-iters": a.step_iters,
                 "--prune-iters": a.prune_iters, "--prune-lr": a.prune_lr, "--scope": a.scope,
                 "--importance": a.importance, "--quant-iters": a.quant_iters, "--batch": a.batch}
        return ([k if v is True else f"{k} {v}" for k, v in flags.items() if v is not None]
                + [f"--set {x}" for x in a.set])

    def write(self) -> None:
        from act.run.artifacts import markdown_table

        total = round(time.time() - self.t0, 1)
        settings = dict(vars(self.args), imgsz=self.b.imgsz, device=self.b.device, data_yaml=self.b.data_yaml,
                        latency_runs=self.latency_runs)
        (self.out / "bench_prune.json").write_text(json.dumps(
            {"settings": settings, "env": self.b.env, "total_s": total, "rows": self.rows}, indent=2, default=str))
        teacher = next((r for r in self.rows if r["method"] == "FP32 teacher" and "error" not in r), None)
        md = [f"# act pruning benchmark: yolo11n-pose on coco-pose-mini "
              f"({'quick CPU smoke run' if self.args.quick else 'full'})", "",
              f"Device: {self.b.env['device']}; imgsz {self.b.imgsz}; val images: {self.b.max_images or 'all'}; "
              f"total {total} s.", f"Recipe: {Path(self.args.config).name}"
              + (f" with {' '.join(self.changes())}." if self.changes() else " as committed."),
              "", markdown_table(self.rows, COLUMNS), ""]
        if teacher:
            for r in self.rows:
                if r is not teacher and "pose_map50_95" in r:
                    md.append(f"- {r['method']}: pose mAP50-95 {100 * (r['pose_map50_95'] - teacher['pose_map50_95']):+.2f}"
                              f" points vs the teacher")
        for t, run in sorted(self.runs.items(), reverse=True):
            md.append(f"- {self.run_name(t)}: `act compress --config {Path(self.args.config).name} "
                      f"{' '.join(self.recipe_overrides(t))}` (plus data, device and "
                      f"output overrides), exit {run['rc']}, {run['wall_s']} s wall"
                      + (f" sharing the device {self.args.parallel} ways" if self.args.parallel > 1 else ""))
        md += ["- MACs / params: torch-pruning's counter at imgsz, batch 1. ORT CPU ms: onnxruntime CPUExecutionProvider, "
               f"median of {self.latency_runs} runs after warm-up, batch 1, all graph optimizations.",
               "- compression wall s: the stage's training steps (pruning steps and evaluation excluded)."]
        errors = [f"- {r['method']}: {r['error']}" for r in self.rows if "error" in r]
        if errors:
            md += ["", "Errors:", *errors]
        (self.out / "bench_prune.md").write_text("\n".join(md) + "\n")


def _read_yaml(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    b = PruneBench(args)
    targets = args.targets or [args.target]
    pi, qi = b.stage_indices()
    b.add("FP32 teacher", b.teacher_row)
    print(f"\nbench_prune: staged runs (prune -> quant) at {targets} x MACs ...", flush=True)
    b.runs = b.run_all(targets)
    for t in targets:
        pct = f"{t:g}x MACs"
        b.add(f"prune {pct} (FP32)", lambda t=t: b.stage_row(t, pi))
        b.add(f"prune {pct} + INT8", lambda t=t: b.stage_row(t, qi))
        if args.onnx_rows:
            b.add(f"prune {pct} + INT8 ONNX (onnxruntime)", lambda t=t: b.stage_row(t, qi, onnx=True))
    print("\n" + (b.out / "bench_prune.md").read_text())
    print(f"bench_prune: wrote {b.out / 'bench_prune.md'} and {b.out / 'bench_prune.json'}")
    return 1 if any("error" in r for r in b.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
