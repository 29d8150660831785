"""Measured latency of an ONNX model on this CPU, at its own input shape, median over runs after warm-up: in
onnxruntime (Q/DQ run as written) and in OpenVINO (Q/DQ fused into INT8 kernels, as deployed; act.deploy.openvino)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


def ort_latency(path: Path, runs: int = 20, warmup: int = 3, threads: Optional[int] = None) -> Dict[str, float]:
    """{median_ms, min_ms, runs, batch, threads} of `sess.run` on random input (full graph optimizations, as
    deployed). The input's dynamic dimensions are taken as 1 (batch) or 640 (spatial)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else (1 if i == 0 else 640) for i, d in enumerate(inp.shape)]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "runs": runs,
            "batch": shape[0], "imgsz": shape[2:], "threads": threads or so.intra_op_num_threads or "default"}


def openvino_latency(path: Path, runs: int = 20) -> Optional[Dict[str, Any]]:
    """OpenVINO CPU latency (LATENCY hint, batch 1) and throughput (THROUGHPUT hint) of an ONNX as OpenVINO deploys
    it (act.deploy.openvino.latency_of_onnx); None when OpenVINO is not installed or runs is 0."""
    from act.core.optional_deps import openvino_available

    if runs <= 0 or not Path(path).is_file() or not openvino_available():
        return None
    from act.deploy.openvino import latency_of_onnx

    return latency_of_onnx(Path(path), runs=runs)


def tensorrt_latency(path: Path, runs: int = 20, engine_path: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """TensorRT latency (batch 1, median of `runs` after warm-up, the engine alone) of an engine built from the ONNX
    (written to `engine_path`, default next to the ONNX; an engine newer than the ONNX is reused); None where
    TensorRT or a CUDA GPU is missing."""
    import importlib.util

    import torch

    if runs <= 0 or importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        return None
    from act.deploy.tensorrt import build_engine, engine_latency

    path = Path(path)
    engine = Path(engine_path) if engine_path else path.with_suffix(".engine")
    if not engine.is_file() or engine.stat().st_mtime < path.stat().st_mtime:
        build_engine(path, engine, log=lambda s: None)
    res = engine_latency(engine, [1], warmup=max(runs // 2, 5), iters=runs, log=lambda s: None)
    row = res["rows"][0]
    return {"median_ms": row["median_ms"], "min_ms": row["min_ms"], "runs": runs, "batch": 1,
            "tensorrt": res["tensorrt"], "gpu": res["gpu"], "engine": str(engine)}
