#!/usr/bin/env python
"""Pruning benchmark: FP32 teacher vs act prune to 0.6x MACs (FP32) vs prune + INT8 (QAT-distill), for yolo11n-pose
on coco-pose-mini (train split = the unlabeled pool, val split = the 500 labeled images). One staged `act compress`
run (configs/yolo11n_pose_prune_qat.yaml: prune stage, then quant stage) makes both compressed rows.

    python tools/bench_prune.py --data .bench_data/coco-pose-mini --out results/prune    # one GPU, 640 px, ~5 min
    python tools/bench_prune.py --out /tmp/bench_prune --quick                            # CPU smoke run

Columns: pose / box mAP (Ultralytics validators on val, square letterbox, the same code as `act eval` and
tools/benchmark.py), label-free fidelity vs the teacher on the held-out train slice, MACs and parameters at imgsz
(torch-pruning's counter), onnxruntime CPU latency of each row's ONNX (batch 1, median of --latency-runs; the INT8
row's ONNX is the Q/DQ model, which onnxruntime runs with its integer kernels). The compressed rows evaluate best.pt in
torch (the fake-quantized student for INT8); --onnx-rows adds their ONNX files evaluated in onnxruntime.
Writes OUT/bench_prune.md and OUT/bench_prune.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
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
    p.add_argument("--scope", choices=["uniform", "global"], default=None, help="default: the recipe's")
    p.add_argument("--importance", choices=["l1", "l2", "group_norm", "lamp", "taylor"], default=None,
                   help="default: the recipe's")
    p.add_argument("--prune-iters", type=int, default=None, help="prune stage iterations, pruning steps included "
                                                                 "(default: the recipe's; --quick 4)")
    p.add_argument("--prune-steps", type=int, default=None, help="pruning steps (default 2; --quick 2)")
    p.add_argument("--step-iters", type=int, default=None, help="distillation iterations between pruning steps "
                                                                "(default 200; --quick 2)")
    p.add_argument("--prune-lr", type=float, default=None, help="prune stage learning rate (default: the recipe's)")
    p.add_argument("--quant-iters", type=int, default=None, help="quant stage iterations (default 300; --quick 2)")
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
    p.add_argument("--resume", action="store_true", help="continue the staged run in OUT/runs/prune_qat (act's own "
                                                         "--resume: finished stages are kept), then evaluate")
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
        self.t0 = time.time()

    # ---- rows ----------------------------------------------------------------------------------------------------
    def teacher_row(self):
        from act.build import load_frozen
        from act.export import export_onnx
        from act.latency import ort_latency
        from act.prune import model_cost

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

    def staged_run(self) -> Dict:
        from act.compress import AutoCompression

        a, q = self.args, self.args.quick
        o = self.b.common("prune_qat") + ["eval.metric=fidelity_pose_map50_95",
                                          f"export.latency_runs={self.latency_runs}"]
        steps = a.prune_steps or 2
        step_iters = a.step_iters or (2 if q else 200)
        q_iters = a.quant_iters or (2 if q else 300)
        raw = _read_yaml(a.config)
        stages = raw["stages"]
        prune = next(s for s in stages if s["type"] == "prune")
        quant = next(s for s in stages if s["type"] == "quant")
        p_iters = a.prune_iters or (4 if q else prune.get("train", {}).get("iterations", 2000))
        prune.update(target=a.target, steps=steps, step_iterations=step_iters)
        if a.scope:
            prune["scope"] = a.scope
        if a.importance:
            prune["importance"] = a.importance
        prune.setdefault("train", {})["iterations"] = p_iters
        if a.prune_lr:
            prune["train"]["lr"] = a.prune_lr
        quant.setdefault("train", {})["iterations"] = q_iters
        # evaluate (label-free, for best.pt) once at the end of each stage: the benchmark evaluates the rows itself
        for s in (prune, quant):
            s["train"]["log_every"] = max(1, min(20, s["train"]["iterations"]))
        o.append(f"eval.every={max(p_iters, q_iters)}")
        if q:
            o += ["data.batch_size=2", "export.parity_images=2", "train.log_every=1", "quant.calib_batches=2"]
        if a.batch:
            o.append(f"data.batch_size={a.batch}")
        o += a.set
        t = time.time()
        resume = a.resume and (self.out / "runs" / "prune_qat" / "stages.json").is_file()
        s = AutoCompression(raw, overrides=o).run(resume=resume, exist_ok=True)
        self.run_s = round(time.time() - t, 1)
        self.summary = s
        return s

    def stage_row(self, index: int):
        s = self.summary["stages"][index]
        d = self.out / "runs" / "prune_qat" / "stages" / f"{index + 1}_{s['stage']['name']}"
        r = self.b.evaluate(str(d / "best.pt"))
        c = s["cost"]
        lat = s.get("latency", {}).get("onnxruntime_cpu", {})
        return {**r, "model": str(d / "best.pt"), **self._cost(c["macs"], c["params"]), "macs_ratio": c["macs_ratio"],
                "ort_cpu_ms": lat.get("median_ms"), "latency": lat, "iterations": s["iterations"],
                "compress_s": s["time_s"].get("compress"), "prune_steps": s["stage"].get("prune_steps")}

    def onnx_row(self, index: int):
        s = self.summary["stages"][index]
        onnx = Path(s["onnx"]["path"])
        r = self.b.evaluate(str(onnx), max_images=self.args.onnx_max_images, device=self.args.onnx_device)
        return {**r, "model": str(onnx), "macs_ratio": s["cost"]["macs_ratio"],
                "ort_cpu_ms": s.get("latency", {}).get("onnxruntime_cpu", {}).get("median_ms")}

    # ---- output --------------------------------------------------------------------------------------------------
    def add(self, method, fn) -> Dict:
        row = self.bm.run_row(method, fn, "bench_prune")
        self.rows.append(row)
        self.write()
        self.bm._free()
        return row

    def write(self) -> None:
        from act.artifacts import markdown_table

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
              + (f" with {' '.join(f'--set {x}' for x in self.args.set)}." if self.args.set else " as committed."),
              "", markdown_table(self.rows, COLUMNS), ""]
        if teacher:
            for r in self.rows:
                if r is not teacher and "pose_map50_95" in r:
                    md.append(f"- {r['method']}: pose mAP50-95 {100 * (r['pose_map50_95'] - teacher['pose_map50_95']):+.2f}"
                              f" points vs the teacher")
        if getattr(self, "run_s", None):
            md.append(f"- staged run (both stages, with their pruning steps, evaluations and exports): {self.run_s} s")
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
    pct = f"{args.target:g}x MACs"
    b.add("FP32 teacher", b.teacher_row)
    print("\nbench_prune: staged run (prune -> quant) ...", flush=True)
    try:
        b.staged_run()
    except Exception as e:
        traceback.print_exc()
        b.rows.append({"method": f"act staged run (prune {pct} -> INT8)", "error": f"{type(e).__name__}: {e}"})
        b.write()
    else:
        b.add(f"prune {pct} (FP32)", lambda: b.stage_row(0))
        b.add(f"prune {pct} + INT8", lambda: b.stage_row(1))
        if args.onnx_rows:
            b.add(f"prune {pct} (FP32) ONNX (onnxruntime)", lambda: b.onnx_row(0))
            b.add(f"prune {pct} + INT8 ONNX (onnxruntime)", lambda: b.onnx_row(1))
    print("\n" + (b.out / "bench_prune.md").read_text())
    print(f"bench_prune: wrote {b.out / 'bench_prune.md'} and {b.out / 'bench_prune.json'}")
    return 1 if any("error" in r for r in b.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
