#!/usr/bin/env python
"""Does the fast step train the same model as the eager one? Loss curves and exported Q/DQ placement, side by side.

    python tools/compare_fast_path.py --config configs/yolo11n_pose_qat_mini.yaml \
        --data .bench_data/coco-pose-mini/data.yaml --iters 300 --out results/fast_path      # one GPU, ~4 min

Three short runs of the recipe (`AutoCompression`, the QAT flow of `act compress`, same calibration):
  eager        train.cuda_graph=false train.compile=false train.channels_last=false, seed 0
  fast         train.cuda_graph=true train.compile=quantizers train.channels_last=true, seed 0
  eager seed 1 the eager step with another data order: what "within noise" means
Reports the loss curves' gap (moving average over --window steps, mean relative difference to the eager seed-0
curve) for fast vs eager and for eager seed 1 vs eager, and whether the exported ONNX files have the same Q/DQ
placement (the same tensors quantized, the same weights) with scales within a few percent. Writes
OUT/fast_path.md and OUT/fast_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("ACT_NO_PROGRESS", "1")

EAGER = ["train.cuda_graph=false", "train.compile=false", "train.channels_last=false"]
FAST = ["train.cuda_graph=true", "train.compile=quantizers", "train.channels_last=true"]
RUNS = {"eager": EAGER + ["train.seed=0"], "fast": FAST + ["train.seed=0"], "eager_seed1": EAGER + ["train.seed=1"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/yolo11n_pose_qat_mini.yaml"))
    p.add_argument("--data", help="Ultralytics data yaml (its train split is the pool); default: the config's")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--runs", nargs="*", default=list(RUNS), help=f"of {', '.join(RUNS)}")
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--out", default="results/fast_path")
    return p.parse_args(argv)


def smooth(xs: List[float], w: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def curve_gap(ref: List[float], other: List[float], w: int) -> float:
    """Mean relative difference of the two smoothed curves (past the first window)."""
    a, b = smooth(ref, w), smooth(other, w)
    n = min(len(a), len(b))
    pairs = [(x, y) for x, y in zip(a[w:n], b[w:n]) if x == x and y == y]
    return sum(abs(y - x) / max(abs(x), 1e-12) for x, y in pairs) / max(1, len(pairs))


def qdq_placement(onnx_path: str) -> Dict[str, float]:
    """Quantized tensor name -> scale (the largest, of its first QuantizeLinear), from the linter's graph view."""
    import numpy as np

    from act.deploy.lint import _Graph, _load

    g = _Graph(_load(onnx_path)[0])
    out: Dict[str, float] = {}
    for n in g.nodes:
        if n.op_type == "QuantizeLinear":
            out.setdefault(n.input[0], float(np.max(g.const.get(n.input[1], np.nan))))
    return out


def run_one(args, name: str, overrides: List[str]) -> Dict[str, Any]:
    from act import AutoCompression

    ov = list(overrides) + [f"train.iterations={args.iters}", f"output_dir={Path(args.out) / name}",
                            "eval.every=1000000", "eval.data=null", "train.checkpoint_every=1000000",
                            "train.log_every=50"] + list(args.set)
    if args.data:
        ov.append(f"data.train={args.data}")
    if args.batch:
        ov.append(f"data.batch_size={args.batch}")
    if args.imgsz:
        ov.append(f"data.imgsz={args.imgsz}")
    t = time.time()
    ac = AutoCompression(args.config, overrides=ov)
    summary = ac.run(exist_ok=True)
    onnx = summary.get("onnx") or {}
    return {"name": name, "overrides": overrides, "wall_s": round(time.time() - t, 1),
            "loss": list(ac.trainer.loss_history), "onnx": onnx.get("path"),
            "parity_passed": (onnx.get("parity") or {}).get("passed"),
            "lint": (onnx.get("lint") or {}).get("passed", onnx.get("lint")), "speed": summary.get("speed"),
            "graph": ac.trainer.step_graph.info() if ac.trainer.step_graph is not None else None}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.runs:
        runs[name] = run_one(args, name, RUNS[name])
        (out / "fast_path.json").write_text(json.dumps(runs, indent=1))
    rows = []
    ref = runs.get("eager")
    ref_q = qdq_placement(ref["onnx"]) if ref and ref.get("onnx") else None
    for name, r in runs.items():
        row = {"run": name, "wall_s": r["wall_s"], "final_loss": round(smooth(r["loss"], args.window)[-1], 6),
               "img_s": (r.get("speed") or {}).get("train_images_per_s"), "parity": r.get("parity_passed")}
        if ref is not None and name != "eager":
            row["curve_gap"] = round(curve_gap(ref["loss"], r["loss"], args.window), 4)
        if ref_q is not None and r.get("onnx"):
            q = qdq_placement(r["onnx"])
            row["same_placement"] = set(q) == set(ref_q)
            common = [k for k in q if k in ref_q and ref_q[k] > 0]
            row["scale_gap_median"] = round(sorted(abs(q[k] / ref_q[k] - 1) for k in common)[len(common) // 2], 4) \
                if common else None
            row["quantized_tensors"] = len(q)
        rows.append(row)
    (out / "fast_path.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    cols = ["run", "final_loss", "curve_gap", "same_placement", "quantized_tensors", "scale_gap_median", "parity",
            "img_s", "wall_s"]
    lines = [f"# fast step vs eager step ({args.iters} iterations, loss smoothed over {args.window})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "fast_path.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
