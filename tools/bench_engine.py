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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def torch_dtype(trt, dt):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dt]


def bench(engine_path: Path, batches, warmup: int, iters: int):
    import torch

    from act.deploy.tensorrt import import_tensorrt, read_engine_header

    trt = import_tensorrt("timing a TensorRT engine")
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine: no CUDA GPU visible to torch")
    offset, meta = read_engine_header(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if meta.get("dla") is not None:
        runtime.DLA_core = int(meta["dla"])
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes()[offset:])
    if engine is None:
        raise SystemExit(f"bench_engine: TensorRT {trt.__version__} could not deserialize {engine_path}")
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    inp = inputs[0]
    shape = tuple(engine.get_tensor_shape(inp))
    dynamic = shape[0] == -1
    if dynamic:
        lo, _, hi = engine.get_tensor_profile_shape(inp, 0)
        batches = batches or [lo[0], hi[0]]
    else:
        if batches and any(b != shape[0] for b in batches):
            print(f"bench_engine: static engine of batch {shape[0]}; timing that batch only")
        batches = [shape[0]]
    stream = torch.cuda.Stream()
    rows = []
    for b in batches:
        if dynamic:
            if not lo[0] <= b <= hi[0]:
                print(f"bench_engine: batch {b} is outside the profile [{lo[0]}, {hi[0]}]; skipped")
                continue
            ctx.set_input_shape(inp, (b, *shape[1:]))
        buffers = {}
        for n in names:
            shp = tuple(ctx.get_tensor_shape(n))
            buffers[n] = torch.empty(shp, dtype=torch_dtype(trt, engine.get_tensor_dtype(n)), device="cuda")
            if n == inp:
                buffers[n].uniform_(0, 1)
            ctx.set_tensor_address(n, buffers[n].data_ptr())
        times = []
        with torch.cuda.stream(stream):
            for i in range(warmup + iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                ok = ctx.execute_async_v3(stream.cuda_stream)
                end.record(stream)
                end.synchronize()
                if not ok:
                    raise SystemExit("bench_engine: execute_async_v3 failed")
                if i >= warmup:
                    times.append(start.elapsed_time(end))
        med = statistics.median(times)
        rows.append({"batch": b, "median_ms": round(med, 4), "p90_ms": round(sorted(times)[int(0.9 * len(times))], 4),
                     "min_ms": round(min(times), 4), "images_per_s": round(1000.0 * b / med, 1), "iters": iters})
        print(f"batch {b:>3}: median {med:.3f} ms  ({rows[-1]['images_per_s']:.0f} img/s, p90 {rows[-1]['p90_ms']} ms)")
    return {"engine": str(engine_path), "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "input": inp, "shape": list(shape), "warmup": warmup, "rows": rows}


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

    try:
        res = bench(a.engine, a.batch, a.warmup, a.iters)
    except ActError as e:
        print(f"bench_engine: {e}", file=sys.stderr)
        return e.exit_code
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
