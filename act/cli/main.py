"""`act` command line: a thin layer over the Python API. User errors print one message and exit non-zero
(2 for bad config or input), never a stack trace."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("YOLO_OFFLINE", "1")


def _compress(args) -> int:
    from act.orchestrate.compress import AutoCompression

    if args.devices and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from act.blocks.dist import launch, parse_devices

        devices = parse_devices(args.devices)
        if len(devices) > 1:  # one process per device, through torchrun
            child = ["compress", "--config", args.config] + (["--resume"] if args.resume else []) + (
                ["--exist-ok"] if args.exist_ok else []) + (["--force"] if args.force else []) + list(args.overrides)
            return launch(devices, child)
        args.overrides = list(args.overrides) + [
            "train.device=" + ("cpu" if devices[0] == "cpu" else f"cuda:{devices[0]}")]
    runner = AutoCompression(args.config, overrides=args.overrides)
    runner.run(resume=args.resume, exist_ok=args.exist_ok, force=args.force)
    return 0


def _ptq(args) -> int:
    from act.orchestrate.analyze import AutoSkip
    from act.run.ptq import PostTrainingQuantization

    PostTrainingQuantization(args.config, overrides=args.overrides, hooks=[AutoSkip()]).run(exist_ok=args.exist_ok)
    return 0


def _analyze(args) -> int:
    from act.orchestrate.analyze import Analysis

    Analysis(args.config, overrides=args.overrides).run()
    return 0


def _frontier(args) -> int:
    from act.orchestrate.frontier import Frontier

    Frontier(args.config, overrides=args.overrides, only=args.only or (), remeasure=args.remeasure,
             make_only=args.make_only).run()
    return 0


def _report(args) -> int:
    import json
    from pathlib import Path

    from act.run.report import write_report_from_dir

    sj = Path(args.run_dir) / "summary.json"
    if sj.is_file() and json.loads(sj.read_text()).get("mode") == "budget":
        from act.orchestrate.budget import write_budget_report

        print(f"act: wrote {write_budget_report(Path(args.run_dir))}")
        return 0
    paths = write_report_from_dir(args.run_dir)
    print(f"act: wrote {paths['md']} and {paths['html']}")
    return 0


def _eval(args) -> int:
    from act.run.artifacts import evaluate_artifacts, markdown_table, write_json

    rows = evaluate_artifacts(args.models, data=args.data, imgsz=args.imgsz, batch=args.batch,
                              max_images=args.max_images, split=args.split, teacher=args.teacher,
                              fidelity_images=args.fidelity_images, fidelity_source=args.fidelity_source,
                              device=args.device, rect=args.rect)
    print(markdown_table(rows))
    if args.json:
        write_json({"data": args.data, "split": args.split, "teacher": args.teacher, "rows": rows}, args.json)
        print(f"act: wrote {args.json}")
    return 0


def _lint(args) -> int:
    from act.deploy.lint import main_lint

    return main_lint(args.model, as_json=args.json, skip=args.skip, target=args.target)


def _export(args) -> int:
    from act.cli.export_command import export

    export(args.source, engine=args.engine, dynamic=True if args.dynamic else None, batch=args.batch,
           imgsz=args.imgsz, out=args.out, overrides=args.overrides, formats=args.format or [])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="act", description="Auto-compression for Ultralytics YOLO models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="distillation QAT: teacher checkpoint + unlabeled images -> INT8 Q/DQ ONNX")
    c.add_argument("--config", required=True, help="run config YAML (see configs/)")
    c.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    c.add_argument("--exist-ok", action="store_true", help="overwrite an output_dir that holds another run")
    c.add_argument("--force", action="store_true", help="with --resume: continue even if the config differs from "
                                                        "the run's (the differences are shown)")
    c.add_argument("--devices", help="data-parallel over these devices, one process each through torchrun: GPU "
                                     "indices '0,1', or 'cpu,cpu' for CPU processes (gloo); data.batch_size is per "
                                     "device (docs/scale.md)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=200 data.imgsz=320")
    c.set_defaults(func=_compress)

    q = sub.add_parser("ptq", help="post-training quantization: calibrate activation ranges (no training) -> Q/DQ ONNX")
    q.add_argument("--config", required=True, help="run config YAML; its ptq section picks the calibrator")
    q.add_argument("--exist-ok", action="store_true", help="overwrite an output_dir that holds another PTQ run")
    q.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ptq.calibrator=entropy ptq.num_images=512")
    q.set_defaults(func=_ptq)

    a = sub.add_parser("analyze", help="per-layer quantization sensitivity (label-free) -> sensitivity.md/.json/.png")
    a.add_argument("--config", required=True, help="run config YAML; its analyze and ptq sections apply")
    a.add_argument("overrides", nargs="*", help="key=value overrides, e.g. analyze.images=32 analyze.layers=[model.23.*]")
    a.set_defaults(func=_analyze)

    f = sub.add_parser("frontier", help="make and measure the accuracy-latency frontier (input size x pruning x "
                                        "precision) -> frontier.md/.json/.png; resumes")
    f.add_argument("--config", required=True, help="run config YAML; its frontier section names the points")
    f.add_argument("--only", action="append", metavar="POINT", help="only this point (and the teacher reference)")
    f.add_argument("--remeasure", nargs="?", const="all", choices=["all", "latency"],
                   help="measure every point again (all), or time them again only (latency: e.g. on the machine that "
                        "deploys them, after --make-only on a GPU host)")
    f.add_argument("--make-only", action="store_true", help="make the points (training, export), measure nothing")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. frontier.imgsz=[640,512] "
                                                "frontier.prune=[1.0,0.8]")
    f.set_defaults(func=_frontier)

    r = sub.add_parser("report", help="(re)write report.md / report.html of a finished run directory")
    r.add_argument("run_dir", help="a run's output_dir (with summary.json)")
    r.set_defaults(func=_report)

    e = sub.add_parser("eval", help="evaluate teachers, act checkpoints and exported models with one metric code")
    e.add_argument("models", nargs="+", metavar="MODEL",
                   help="teacher name, Ultralytics .pt, act checkpoint (best.pt / ptq.pt), or exported .onnx")
    e.add_argument("--data", help="labeled Ultralytics data yaml for COCO mAP")
    e.add_argument("--split", default="val", choices=["val", "test", "train"])
    e.add_argument("--imgsz", type=int, help="default: the model's own (export metadata / checkpoint), else 640")
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--max-images", type=int, help="evaluate on the first N images of the split")
    e.add_argument("--teacher", help="teacher for label-free fidelity (name or .pt)")
    e.add_argument("--fidelity-images", type=int, default=64)
    e.add_argument("--fidelity-source", help="unlabeled images for fidelity; default: --data's train split, its "
                                             "held-out slice (the last --fidelity-images images)")
    e.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N'")
    e.add_argument("--rect", action="store_true", help="rectangular batches for torch models (as `yolo val`); "
                                                       "default: square letterbox for all, comparable with exports")
    e.add_argument("--json", help="also write the rows to this JSON file")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="Q/DQ ONNX (with --engine a TensorRT engine, with --format openvino an "
                                      "OpenVINO IR) from a run folder, an act checkpoint or a Q/DQ .onnx")
    x.add_argument("source", help="act run folder (its best.pt), act checkpoint .pt, or Q/DQ .onnx (engine only)")
    x.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs act[tensorrt])")
    x.add_argument("--format", action="append", choices=["openvino"],
                   help="also write this format: openvino = <stem>_openvino_model/ in Ultralytics' layout, checked "
                        "in OpenVINO per output branch (needs act[openvino])")
    x.add_argument("--dynamic", action="store_true", help="dynamic batch (engine profile: export.tensorrt."
                                                          "min_batch/opt_batch/max_batch)")
    x.add_argument("--batch", type=int, help="fixed batch of the ONNX (default export.batch)")
    x.add_argument("--imgsz", type=int, help="default: the checkpoint's")
    x.add_argument("--out", help="ONNX path (default: student.onnx / student_dynamic.onnx next to the checkpoint)")
    x.add_argument("overrides", nargs="*", help="export.* overrides, e.g. export.tensorrt.max_batch=16")
    x.set_defaults(func=_export)

    lq = sub.add_parser("lint-qdq", help="check a Q/DQ ONNX for placement its target runtime cannot fuse or computes "
                                         "differently (exit 1 on findings)")
    lq.add_argument("model", help="ONNX file")
    lq.add_argument("--target", choices=["tensorrt", "cpu"],
                    help="the rules of this target (default: the act_target the file was exported for, else tensorrt)")
    lq.add_argument("--json", action="store_true", help="print the report as JSON")
    lq.add_argument("--skip", action="append", metavar="PATTERN",
                    help="module-name pattern kept float on purpose (default: those act wrote into the metadata)")
    lq.set_defaults(func=_lint)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from act.core.errors import ActError, Interrupted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"act: {e}", file=sys.stderr)
        return e.exit_code
    except ActError as e:
        print(f"act: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("act: interrupted (the last complete checkpoint, if any, is intact; resume with --resume)",
              file=sys.stderr)
        return 130
    except OSError as e:  # an environment problem outside act's own writes (e.g. TensorBoard's event file)
        from act.core.fileio import describe_os_error

        print(f"act: error: {describe_os_error(e, e.filename or 'a file')}", file=sys.stderr)
        return 5
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"act: error: CUDA out of memory ({str(e).splitlines()[0]}); try a smaller data.batch_size or "
                  f"eval.batch_size", file=sys.stderr)
            return 5
        raise


if __name__ == "__main__":
    sys.exit(main())
