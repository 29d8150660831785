"""`act` command line: a thin layer over the Python API. User errors print one message and exit non-zero
(2 for bad config or input), never a stack trace."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("YOLO_OFFLINE", "1")


def _compress(args) -> int:
    from act.compress import AutoCompression

    runner = AutoCompression(args.config, overrides=args.overrides)
    runner.run(resume=args.resume, exist_ok=args.exist_ok)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="act", description="Auto-compression for Ultralytics YOLO models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="distillation QAT: teacher checkpoint + unlabeled images -> INT8 Q/DQ ONNX")
    c.add_argument("--config", required=True, help="run config YAML (see configs/)")
    c.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    c.add_argument("--exist-ok", action="store_true", help="overwrite an output_dir that holds another run")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=200 data.imgsz=320")
    c.set_defaults(func=_compress)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from act.errors import ActError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ActError as e:
        print(f"act: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("act: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
