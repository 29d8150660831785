#!/usr/bin/env python
"""act's INT8 model in OpenVINO beside its peer, Ultralytics' own OpenVINO INT8 export (NNCF), on this CPU:
dev-val pose / box mAP and OpenVINO latency in one table.

    python tools/bench_openvino.py --data ../shared/data/coco-pose-mini --out results/openvino \\
        --act runs/qat_cpu_s0 runs/qat_cpu_s1 --ptq --nncf

Rows:
  teacher FP32            the teacher (torch, and its FP32 ONNX in OpenVINO: latency at FP32 and at the CPU's default
                          float precision, bf16 on AVX512-BF16 / AMX CPUs)
  act PTQ (target T)      `--ptq`: `act ptq` on the pool (its recipe's ptq settings), for export.target tensorrt and
                          cpu; the ONNX in onnxruntime, the cpu model's IR in OpenVINO
  act <run>               `--act RUN ...`: finished act runs (e.g. the QAT recipe with export.target=cpu): their
                          student.onnx in onnxruntime and, for export.target cpu (or where it exists),
                          student_openvino_model/ in OpenVINO (written if missing)
  Ultralytics NNCF INT8   `--nncf`: `YOLO(teacher).export(format='openvino', int8=True, data=<pool>, split='train')`,
                          calibrated on the same unlabeled pool images act distills on
mAP: `act.run.artifacts.evaluate_artifacts` (Ultralytics' validators, square letterbox, every model alike). Latency:
OpenVINO CPU, batch 1, LATENCY hint, median of --runs after warm-up, the fastest of --rounds interleaved rounds (this
VM's timings swing); throughput with the THROUGHPUT hint. Writes OUT/bench_openvino.md and .json after every row
(`--resume` keeps the rows already there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")

COLUMNS = [("row", "model"), ("runtime", "runtime"), ("pose_map50_95", "pose mAP50-95"), ("pose_map50", "pose mAP50"),
           ("box_map50_95", "box mAP50-95"), ("ov_ms", "OpenVINO ms (b1, LATENCY)"),
           ("ov_vs_teacher", "vs teacher FP32 ms"), ("ov_images_per_s", "OpenVINO img/s (THROUGHPUT)"),
           ("precision", "float layers")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/coco-pose-mini"), help="coco-pose-mini folder")
    p.add_argument("--out", default="results/openvino")
    p.add_argument("--teacher", default="yolo11n-pose")
    p.add_argument("--config", default=str(ROOT / "configs/yolo11n_pose_qat_mini.yaml"), help="recipe for --ptq")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--act", nargs="*", default=[], help="finished act run folders to score")
    p.add_argument("--ptq", action="store_true", help="run `act ptq` for both targets (CPU, a few minutes)")
    p.add_argument("--ptq-images", type=int, default=None, help="default: the recipe's ptq.num_images")
    p.add_argument("--nncf", action="store_true", help="Ultralytics' OpenVINO INT8 export (needs nncf)")
    p.add_argument("--before", action="store_true", help="also the tensorrt-target PTQ ONNX read by OpenVINO as is "
                                                         "(signed-int8 activations: the state before export.target)")
    p.add_argument("--tensorrt-in-openvino", action="store_true",
                   help="also the tensorrt-target PTQ model's OpenVINO IR (8-bit weights: exact only on VNNI CPUs)")
    p.add_argument("--nncf-fraction", type=float, default=1.0, help="share of the pool NNCF calibrates on")
    p.add_argument("--max-images", type=int, default=None, help="val images (default all)")
    p.add_argument("--runs", type=int, default=30, help="timed inferences per latency round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds; the fastest is kept")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        data = Path(args.data)
        self.data_dir = (data.parent if data.suffix in (".yaml", ".yml") else data).resolve()
        # a data yaml with an absolute path: Ultralytics resolves a relative one against its own datasets folder
        self.data_yaml = self.out / "data.yaml"
        self.data_yaml.write_text(f"path: {self.data_dir}\ntrain: images/train\nval: images/val\n"
                                  f"kpt_shape: [17, 3]\nflip_idx: [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, "
                                  f"16, 15]\nnames:\n  0: person\n")
        self.rows: List[Dict[str, Any]] = []
        self.latency_models: Dict[str, tuple] = {}  # row -> (path, precision)
        js = self.out / "bench_openvino.json"
        if args.resume and js.is_file():
            self.rows = json.loads(js.read_text())["rows"]

    def done(self, name: str) -> bool:
        return any(r["row"] == name and "pose_map50_95" in r for r in self.rows)

    def save(self) -> None:
        from act.run.artifacts import markdown_table

        (self.out / "bench_openvino.json").write_text(json.dumps({"settings": vars(self.args), "rows": self.rows},
                                                                 indent=2, default=str))
        (self.out / "bench_openvino.md").write_text(markdown_table(self.rows, COLUMNS) + "\n")

    def evaluate(self, name: str, model: str, runtime: str, latency=None) -> None:
        """One row: dev-val mAP of `model`; latency: (path, precision) timed in OpenVINO with the others."""
        from act.run.artifacts import evaluate_artifacts

        if latency:
            self.latency_models[name] = latency
        if self.done(name):
            return
        t = time.time()
        row = evaluate_artifacts([model], data=str(self.data_yaml), imgsz=self.args.imgsz, batch=16,
                                 max_images=self.args.max_images, device="cpu")[0]
        keep = {k: row[k] for k in ("pose_map50_95", "pose_map50", "box_map50_95") if k in row}
        self.rows = [r for r in self.rows if r["row"] != name]
        self.rows.append({"row": name, "runtime": runtime, "model": model, **keep, "eval_s": round(time.time() - t)})
        print(f"bench: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in keep.items()), flush=True)
        self.save()

    # ---- models ----------------------------------------------------------------------------------------------
    def teacher(self) -> None:
        from act.run.build import load_frozen
        from act.deploy.export import export_onnx

        model, family, src = load_frozen(self.args.teacher)
        self.teacher_pt = Path(src.path)
        onnx_path = export_onnx(model, self.out / "teacher.onnx", family, self.args.imgsz)
        self.evaluate("teacher FP32", self.args.teacher, "torch")
        self.latency_models["teacher FP32 (f32)"] = (onnx_path, "f32")
        self.latency_models["teacher FP32 (CPU default precision)"] = (onnx_path, "auto")

    def ptq(self) -> None:
        for target in ("tensorrt", "cpu"):
            run = self.out / "runs" / f"ptq_{target}"
            if not (run / "student.onnx").is_file():
                over = [f"data.train={self.data_yaml}", f"data.imgsz={self.args.imgsz}", "eval.data=null",
                        "eval.metric=null", "train.device=cpu", f"export.target={target}", f"output_dir={run}",
                        "report.enabled=false", "data.workers=2"]
                if self.args.ptq_images:
                    over.append(f"ptq.num_images={self.args.ptq_images}")
                subprocess.run([sys.executable, "-m", "act", "ptq", "--config", self.args.config, "--exist-ok", *over],
                               check=True, cwd=ROOT)
            self.evaluate(f"act PTQ (target {target}), ONNX", str(run / "student.onnx"), "onnxruntime")
            if target == "cpu" or self.args.tensorrt_in_openvino:
                self.act_openvino(f"act PTQ (target {target})", run)
            if target == "tensorrt" and self.args.before:
                self.before_fix(run)

    def act_openvino(self, name: str, run: Path) -> None:
        from act.deploy import openvino

        ir = run / "student_openvino_model"
        if not (ir / "student.xml").is_file():
            openvino.write_ir(run / "student.onnx", ir)
        self.evaluate(f"{name}, OpenVINO IR", str(ir), "openvino", latency=(ir, "auto"))

    def before_fix(self, run: Path) -> None:
        """The tensorrt-target ONNX as OpenVINO reads the file itself (core.read_model, what compile_model on the
        .onnx and benchmark_app do; saved as an IR so Ultralytics can run it): signed-int8 activations, what act
        delivered before export.target cpu existed. (ov.convert_model would fix it up: docs/deployment.md.)"""
        import openvino as ov
        import yaml

        from act.deploy.onnx_hygiene import metadata_of

        ir = run / "unchanged_openvino_model"
        if not (ir / "student.xml").is_file():
            ir.mkdir(parents=True, exist_ok=True)
            ov.save_model(ov.Core().read_model(str(run / "student.onnx")), str(ir / "student.xml"),
                          compress_to_fp16=False)
            import onnx

            meta = metadata_of(onnx.load(str(run / "student.onnx")))
            (ir / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        self.evaluate("act PTQ (target tensorrt), its ONNX read by OpenVINO directly (before the fix)", str(ir),
                      "openvino")

    def runs(self) -> None:
        import yaml

        for run in map(Path, self.args.act):
            label = f"act {run.name}"
            self.evaluate(f"{label}, ONNX", str(run / "student.onnx"), "onnxruntime")
            cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
            if (cfg.get("export") or {}).get("target") == "cpu" or (run / "student_openvino_model").is_dir():
                self.act_openvino(label, run)

    def nncf(self) -> None:
        from ultralytics import YOLO

        folder = self.out / "nncf" / "yolo11n-pose_int8_openvino_model"
        if not (folder / "metadata.yaml").is_file():
            work = self.out / "nncf"
            work.mkdir(parents=True, exist_ok=True)
            pt = work / "yolo11n-pose.pt"
            shutil.copy(self.teacher_pt, pt)
            made = YOLO(str(pt)).export(format="openvino", int8=True, data=str(self.data_yaml), split="train",
                                        imgsz=self.args.imgsz, batch=1, fraction=self.args.nncf_fraction)
            folder = Path(made)
        self.evaluate("Ultralytics OpenVINO INT8 (NNCF)", str(folder), "openvino", latency=(folder, "auto"))

    # ---- latency ---------------------------------------------------------------------------------------------
    def latency(self) -> None:
        from act.deploy import openvino

        best: Dict[str, Dict[str, Any]] = {}
        for _ in range(self.args.rounds):  # interleaved: every model once per round
            for name, (path, precision) in self.latency_models.items():
                lat = openvino.latency(path, runs=self.args.runs, precision=precision)
                if name not in best or lat["median_ms"] < best[name]["median_ms"]:
                    best[name] = lat
        ref = best.get("teacher FP32 (f32)", {}).get("median_ms")
        for name, lat in best.items():
            row = next((r for r in self.rows if r["row"] == name), None)
            if row is None:  # the teacher's ONNX rows: latency only (its accuracy is the torch row)
                row = {"row": name, "runtime": "openvino"}
                self.rows.append(row)
            row.update(ov_ms=lat["median_ms"], ov_images_per_s=lat["throughput_images_per_s"],
                       precision=lat["precision"], ov_vs_teacher=round(lat["median_ms"] / ref, 3) if ref else None)
        self.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    b = Bench(args)
    b.teacher()
    if args.ptq:
        b.ptq()
    b.runs()
    if args.nncf:
        b.nncf()
    b.latency()
    print((b.out / "bench_openvino.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
