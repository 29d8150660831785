#!/usr/bin/env python3
"""Time a TensorRT engine (act's or Ultralytics'): warm-up, then the median of N timed runs, per batch size.

    python tools/bench_engine.py runs/exp/student.engine                     # its batch (static engine)
    python tools/bench_engine.py runs/exp/student_dynamic.engine --batch 1 8 16 --iters 200 --json bench.json

Needs `tensorrt` and an NVIDIA GPU (torch CUDA tensors hold the bindings; no pycuda). Times the engine alone
(execute_async_v3 on one CUDA stream, events around each run), not pre/post-processing. For a dynamic-batch engine
each requested batch must lie inside its optimization profile; a static engine runs its own batch only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--batch", type=int, nargs="*", default=[], help="batch sizes (dynamic engines; default: "
                                                                     "the profile's min and max)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--iters", type=int, default=200, help="timed runs per batch size; the median is reported")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    if not a.engine.is_file():
        print(f"bench_engine: not found: {a.engine}", file=sys.stderr)
        return 2
    from act.core.errors import ActError
    from act.deploy.tensorrt import engine_latency

    try:
        res = engine_latency(a.engine, a.batch, a.warmup, a.iters)
    except ActError as e:
        print(f"bench_engine: {e}", file=sys.stderr)
        return e.exit_code
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
