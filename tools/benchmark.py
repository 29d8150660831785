#!/usr/bin/env python
"""FP32 teacher vs act PTQ (each calibrator) vs act QAT-distill (torch fake-quant and its Q/DQ ONNX in onnxruntime),
for yolo11n-pose on coco-pose-mini: train split = the unlabeled pool, val split = the 500 labeled images.

    python tools/benchmark.py --data ../shared/data/coco-pose-mini --out results/ --parallel 3   # GPU, 640 px
    python tools/benchmark.py --data ../shared/data/coco-pose-mini --out /tmp/bench --quick      # CPU smoke run

Every number in the table comes from one place, `act.run.artifacts.evaluate_artifacts` (the metric code of `act eval`
and of training): COCO mAP on val with Ultralytics' validators, every model letterboxed to the same square imgsz
(the ONNX is fixed-shape), and label-free fidelity against the teacher on the held-out slice of the train pool.
The QAT rows run the recipe exactly as a user does (`act compress --config ... train.seed=S`, one process per seed,
`--parallel` at a time): it calibrates itself (`quant.calibrator`: the best PTQ calibrator by label-free fidelity)
and never sees val labels (best.pt is picked by label-free fidelity). Each seed gives best.pt, last.pt and the
exported ONNX; the mean rows average the seeds, with the spread (max - min) of pose mAP50-95. `--set` adds config
overrides to the QAT runs (`--label` names the variant). Writes OUT/benchmark.md and OUT/benchmark.json (rewritten
after every row, so a cut-off run keeps what it did; `--resume` fills in what is missing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")

from act.blocks.quant.calibrators import CALIBRATORS  # noqa: E402 (after the sys.path line)

CALIBRATORS = list(CALIBRATORS)
COLUMNS = [
    ("method", "method"),
    ("pose_map50_95", "pose mAP50-95"),
    ("pose_map50", "pose mAP50"),
    ("box_map50_95", "box mAP50-95"),
    ("fidelity_pose_map50_95", "fidelity pose mAP (vs teacher)"),
    ("fidelity_snr_db_mean", "head SNR dB"),
    ("compress_s", "compression wall s"),
    ("train_images_per_s", "train step img/s"),
    ("pose_spread", "pose spread over seeds"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="coco-pose-mini folder (or its data.yaml); default: "
                                                "../shared/data/coco-pose-mini, else ./shared/data/coco-pose-mini")
    p.add_argument("--out", default="results", help="output folder for the table, the JSON and the runs")
    p.add_argument("--config", default=str(ROOT / "configs/yolo11n_pose_qat_mini.yaml"), help="QAT / PTQ recipe")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: imgsz 160, a few images, 3 QAT iterations")
    p.add_argument("--device", default=None, help="default: auto (CUDA if available); --quick: cpu")
    p.add_argument("--imgsz", type=int, default=None, help="default 640 (--quick 160)")
    p.add_argument("--calibrators", nargs="+", default=CALIBRATORS, choices=CALIBRATORS)
    p.add_argument("--ptq-images", type=int, default=None, help="calibration images (default 256; --quick 8)")
    p.add_argument("--qat-iters", type=int, default=None, help="QAT iterations (default: the config's; --quick 3)")
    p.add_argument("--qat-batch", type=int, default=None, help="QAT batch size (default: the config's; --quick 2)")
    p.add_argument("--qat-init", default="recipe", help="recipe: what the recipe does itself (quant.calibrator); "
                                                        "best-ptq: quant.init_from the PTQ row with the best fidelity; "
                                                        "a calibrator name; or ema (moving-average calibration)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="QAT seeds (default 0 1 2; --quick 0): one "
                                                                      "row each, plus their mean and spread")
    p.add_argument("--parallel", type=int, default=1, help="QAT runs at once on the device (the step is host-bound: "
                                                           "2-3 share one GPU well; img/s then is per run)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for the QAT runs "
                                                                           "(repeatable), e.g. --set train.ema=0.999")
    p.add_argument("--label", default="", help="added to the QAT rows' names (e.g. to tell --set variants apart)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: the config's; quick 0)")
    p.add_argument("--eval-batch", type=int, default=None, help="default 32 (--quick 8)")
    p.add_argument("--max-images", type=int, default=None, help="val images (default all; --quick 8)")
    p.add_argument("--onnx-max-images", type=int, default=None, help="val images for the ONNX row (default: "
                                                                     "--max-images)")
    p.add_argument("--onnx-device", default="cpu", help="device for onnxruntime (default cpu)")
    p.add_argument("--fidelity-images", type=int, default=None, help="held-out unlabeled images (default 64; quick 8)")
    p.add_argument("--resume", action="store_true", help="keep the rows of OUT/benchmark.json that have no error and "
                                                         "run only the others (e.g. the ONNX row of a cut-off run)")
    p.add_argument("--qat-only", action="store_true", help="only the QAT rows (no teacher / PTQ rows): compare a "
                                                            "--set variant with a table that has them")
    p.add_argument("--skip-onnx", action="store_true", help="leave the QAT ONNX row for a later --resume (on a "
                                                            "machine with more CPU time, say)")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        q = args.quick
        data = Path(args.data) if args.data else next(
            (d for d in (ROOT.parent / "shared/data/coco-pose-mini", ROOT / "shared/data/coco-pose-mini")
             if d.is_dir()), ROOT.parent / "shared/data/coco-pose-mini")
        self.data_yaml = str(data / "data.yaml" if data.is_dir() else data)
        if not Path(self.data_yaml).is_file():
            raise SystemExit(f"benchmark: data yaml not found: {self.data_yaml} (need coco-pose-mini; see --data)")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = args.device or ("cpu" if q else "auto")
        self.imgsz = args.imgsz or (160 if q else 640)
        self.eval_batch = args.eval_batch or (8 if q else 32)
        self.max_images = args.max_images or (8 if q else None)
        self.onnx_max_images = args.onnx_max_images or self.max_images
        self.fid_images = args.fidelity_images or (8 if q else 64)
        self.ptq_images = args.ptq_images or (8 if q else 256)
        self.rows: List[Dict[str, Any]] = []
        self.done: Dict[str, Dict[str, Any]] = {}
        self.t0 = time.time()
        self.prior_s = 0.0
        prior = self.out / "benchmark.json"
        if args.resume and prior.is_file():
            old = json.loads(prior.read_text())
            self.done = {r["method"]: r for r in old.get("rows", []) if "error" not in r}
            self.prior_s = float(old.get("total_s") or 0.0)
            print(f"benchmark: --resume keeps {len(self.done)} rows of {prior}", flush=True)
        self.teacher = "yolo11n-pose"
        self.env = {
            "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() and self.device != "cpu" else
                       f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"),
            "torch": torch.__version__,
        }

    # ---- config overrides shared by every run --------------------------------------------------------------------
    def common(self, name: str) -> List[str]:
        o = [f"data.train={self.data_yaml}", f"data.imgsz={self.imgsz}", f"train.device={self.device}",
             f"output_dir={self.out / 'runs' / name}", "eval.data=null", "eval.before=false",
             f"eval.batch_size={self.eval_batch}", f"eval.fidelity.images={self.fid_images}"]
        if self.args.workers is not None or self.args.quick:
            o.append(f"data.workers={self.args.workers if self.args.workers is not None else 0}")
        return o

    def evaluate(self, model: str, max_images: Optional[int] = None, device: Optional[str] = None) -> Dict:
        from act.run.artifacts import evaluate_artifacts

        rows = evaluate_artifacts([model], data=self.data_yaml, imgsz=self.imgsz, batch=self.eval_batch,
                                  max_images=max_images or self.max_images, teacher=self.teacher,
                                  fidelity_images=self.fid_images, device=device or self.device,
                                  workdir=self.out / "eval")
        return rows[0]

    def add(self, method: str, fn) -> Optional[Dict]:
        if method in self.done:
            print(f"\nbenchmark: {method}: kept from the earlier run", flush=True)
            self.rows.append(self.done[method])
            self.write()
            return self.done[method]
        row = run_row(method, fn)
        self.rows.append(row)
        self.write()
        _free()
        return row

    # ---- rows ----------------------------------------------------------------------------------------------------
    def teacher_row(self):
        r = self.evaluate(self.teacher)
        return {**r, "model": self.teacher}

    def ptq_row(self, calibrator: str):
        from act.run.ptq import PostTrainingQuantization

        name = f"ptq_{calibrator}"
        o = self.common(name) + [f"ptq.calibrator={calibrator}", f"ptq.num_images={self.ptq_images}",
                                 "export.onnx=false"]
        if self.args.quick:
            o += ["ptq.batch_size=4", "ptq.bins=512"]
        s = PostTrainingQuantization(self.args.config, overrides=o).run(exist_ok=True)
        ckpt = self.out / "runs" / name / "ptq.pt"
        r = self.evaluate(str(ckpt))
        return {**r, "model": str(ckpt), "compress_s": s["time_s"]["compress"], "ptq": s.get("ptq")}

    def qat_overrides(self, seed: int) -> List[str]:
        a = self.args
        o = self.common(self.qat_name(seed)) + ["eval.metric=fidelity_pose_map50_95", "strategy=qat",
                                                f"train.seed={seed}"]
        if a.quick:
            o += ["train.iterations=3", "data.batch_size=2", "eval.every=3", "export.parity_images=2",
                  "train.log_every=1", "quant.calib_batches=2", "ptq.num_images=8", "ptq.batch_size=4",
                  "ptq.bins=512"]
        if a.qat_iters:
            o += [f"train.iterations={a.qat_iters}", f"eval.every={max(1, a.qat_iters // 4)}"]
        if a.qat_batch:
            o.append(f"data.batch_size={a.qat_batch}")
        if a.parallel > 1 and a.workers is None and not a.quick:
            o.append(f"data.workers={max(2, (os.cpu_count() or 4) // (2 * a.parallel))}")
        init = self.qat_init()
        if init:
            o.append(f"quant.init_from={init}")
        if a.qat_init not in ("recipe", "best-ptq") and not init:
            o.append("quant.calibrator=ema")
        return o + list(a.sets)

    def qat_name(self, seed: int) -> str:
        return f"qat{('_' + self.args.label) if self.args.label else ''}_s{seed}"

    def qat_method(self, seed: int, what: str) -> str:
        label = f" [{self.args.label}]" if self.args.label else ""
        return f"act QAT-distill{label} seed {seed}: {what}"

    def run_qat(self, seeds: List[int]) -> Dict[int, Dict[str, Any]]:
        """`act compress` of the recipe for each seed, `--parallel` at a time, each in its own process (as a user
        runs it). Returns seed -> its summary.json (or an error)."""
        jobs = {}
        for seed in seeds:
            cmd = [sys.executable, "-m", "act", "compress", "--config", self.args.config, "--exist-ok",
                   *self.qat_overrides(seed)]
            jobs[seed] = (cmd, self.out / "runs" / f"{self.qat_name(seed)}.log", f"QAT seed {seed}")
        done = {}
        for seed, run in run_processes(jobs, self.args.parallel).items():
            summary = self.out / "runs" / self.qat_name(seed) / "summary.json"
            if run["rc"] == 0 and summary.is_file():
                done[seed] = {**json.loads(summary.read_text()), "wall_s": run["wall_s"]}
            else:
                done[seed] = {"error": f"act compress exit {run['rc']}: {Path(run['log']).read_text()[-800:]}"}
        return done

    def qat_rows(self, seed: int, s: Dict[str, Any]) -> None:
        """The rows of one seed: best.pt (what act exports), last.pt, and with ONNX the exported student.onnx."""
        if "error" in s:
            self.rows.append({"method": self.qat_method(seed, "run"), "error": s["error"]})
            return
        run = self.out / "runs" / self.qat_name(seed)
        common = {"compress_s": s["time_s"].get("compress"), "wall_s": s.get("wall_s"),
                  "train_images_per_s": s.get("speed", {}).get("train_images_per_s"), "seed": seed,
                  "iterations": s["iterations"], "best_iteration": s["best_iteration"],
                  "quant_init": s.get("quant_init"), "parity": s.get("onnx", {}).get("parity")}
        what = [("torch, best.pt", run / "best.pt", None), ("torch, last.pt", run / "last.pt", None)]
        if not self.args.skip_onnx:
            what.append(("exported ONNX in onnxruntime", run / "student.onnx", self.args.onnx_device))
        for label, path, device in what:
            self.add(self.qat_method(seed, label), lambda p=path, d=device: {
                **self.evaluate(str(p), max_images=self.onnx_max_images if d else None, device=d),
                "model": str(p), **common})

    def mean_rows(self, seeds: List[int]) -> None:
        """Mean over the seeds of each QAT row kind, with the spread (max - min) of pose mAP50-95."""
        import statistics

        for what in ("torch, best.pt", "torch, last.pt", "exported ONNX in onnxruntime"):
            rows = [r for r in self.rows if any(r["method"] == self.qat_method(s, what) for s in seeds)
                    and "error" not in r]
            if not rows:
                continue
            mean = {"method": f"**{self.qat_method(0, what).replace('seed 0', f'mean of {len(rows)} seeds')}**"}
            for key, _ in COLUMNS[1:]:
                vals = [_num(r.get(key)) for r in rows if r.get(key) is not None]
                if vals and all(v != float("-inf") for v in vals):
                    mean[key] = round(statistics.mean(vals), 4)
            pose = [_num(r.get("pose_map50_95")) for r in rows]
            mean["pose_spread"] = round(max(pose) - min(pose), 4) if len(pose) > 1 else None
            mean["seeds"] = [r.get("seed") for r in rows]
            self.rows = [r for r in self.rows if r["method"] != mean["method"]] + [mean]
        self.write()

    def qat_init(self) -> Optional[str]:
        choice = self.args.qat_init
        if choice in ("ema", "recipe"):
            return None
        ptq = {r["method"].split(" ")[-1].strip("()"): r for r in self.rows
               if r["method"].startswith("act PTQ") and "error" not in r}
        if choice != "best-ptq":
            if choice not in ptq:
                raise RuntimeError(f"--qat-init {choice}: no successful PTQ run with that calibrator")
            return ptq[choice]["model"]
        if not ptq:
            return None
        best = max(ptq.values(), key=lambda r: _num(r.get("fidelity_pose_map50_95", r.get("fidelity_box_map50_95"))))
        return best["model"]

    # ---- output --------------------------------------------------------------------------------------------------
    def write(self) -> None:
        from act.run.artifacts import markdown_table

        settings = {k: v for k, v in vars(self.args).items()}
        settings.update(imgsz=self.imgsz, device=self.device, ptq_images=self.ptq_images,
                        fidelity_images=self.fid_images, max_images=self.max_images, data_yaml=self.data_yaml)
        total = round(self.prior_s + time.time() - self.t0, 1)
        (self.out / "benchmark.json").write_text(json.dumps(
            {"settings": settings, "env": self.env, "total_s": total, "rows": self.rows}, indent=2, default=str))
        errors = [f"- {r['method']}: {r['error']}" for r in self.rows if "error" in r]
        md = [
            f"# act benchmark: yolo11n-pose on coco-pose-mini ({'quick CPU smoke run' if self.args.quick else 'full'})",
            "",
            f"Device: {self.env['device']}; imgsz {self.imgsz}; val images: {self.max_images or 'all'}; "
            f"total {total} s.",
            "",
            markdown_table(self.rows, COLUMNS),
            "",
            "- mAP: COCO mAP50-95 / mAP50 on the labeled val split (Ultralytics validators, square letterbox for every "
            "row; the QAT ONNX row runs in onnxruntime on " + self.args.onnx_device + ").",
            f"- fidelity: the model's detections scored (COCO keypoint mAP, OKS) against the FP32 teacher's own "
            f"detections on the last {self.fid_images} unlabeled train images (held out from calibration and "
            f"training); head SNR: mean over the distillation nodes of 10 log10(|t|^2/|s-t|^2).",
            "- compression wall s: PTQ = calibration; QAT = calibration + training steps (evaluation and export "
            "excluded). train step img/s: images / time in the training steps (data loading included).",
        ]
        if errors:
            md += ["", "Errors:", *errors]
        (self.out / "benchmark.md").write_text("\n".join(md) + "\n")


def run_processes(jobs: Dict[Any, tuple], parallel: int, tool: str = "benchmark") -> Dict[Any, Dict[str, Any]]:
    """Run each job's command in its own process (as a user runs act), `parallel` at a time. jobs: key -> (command,
    log file, label). Returns key -> {"rc", "wall_s", "log"}."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               ACT_NO_PROGRESS="1", YOLO_OFFLINE="1")
    todo, running, done = list(jobs), {}, {}
    while todo or running:
        while todo and len(running) < max(1, parallel):
            key = todo.pop(0)
            cmd, log_path, label = jobs[key]
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w")
            print(f"{tool}: {label}: {' '.join(str(c) for c in cmd[2:])}", flush=True)
            running[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                            time.time(), label)
        time.sleep(2)
        for key, (proc, log, t0, label) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            done[key] = {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1), "log": log.name}
            print(f"{tool}: {label} done (exit {proc.returncode}, {done[key]['wall_s']} s)", flush=True)
    return done


def run_row(method: str, fn, tool: str = "benchmark") -> Dict[str, Any]:
    """One table row: {"method": method, **fn()} and its wall time; a failure becomes an error row, so one failed
    row does not cost the others."""
    print(f"\n{tool}: {method} ...", flush=True)
    t = time.time()
    try:
        row = {"method": method, **fn()}
    except Exception as e:
        traceback.print_exc()
        row = {"method": method, "error": f"{type(e).__name__}: {e}"}
    row["row_s"] = round(time.time() - t, 1)
    return row


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("-inf")


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    b = Bench(args)
    if not args.qat_only:
        b.add("FP32 teacher", b.teacher_row)
        for c in args.calibrators:
            b.add(f"act PTQ ({c})", lambda c=c: b.ptq_row(c))
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    todo = [s for s in seeds if not all(b.qat_method(s, w) in b.done for w in ("torch, best.pt", "torch, last.pt"))]
    runs = b.run_qat(todo) if todo else {}
    for seed in seeds:
        summary = b.out / "runs" / b.qat_name(seed) / "summary.json"
        if seed not in runs and summary.is_file():  # (--resume: the rows it lacks, e.g. a --skip-onnx run's ONNX)
            runs[seed] = json.loads(summary.read_text())
        b.qat_rows(seed, runs.get(seed, {"error": "no run"}))
        b.write()
    if len(seeds) > 1:
        b.mean_rows(seeds)
    print("\n" + (b.out / "benchmark.md").read_text())
    print(f"benchmark: wrote {b.out / 'benchmark.md'} and {b.out / 'benchmark.json'}")
    return 1 if any("error" in r for r in b.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
