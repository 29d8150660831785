"""TensorRT engine from act's Q/DQ ONNX (explicit quantization), written as an Ultralytics `.engine` file.

    build_engine("student.onnx", "student.engine", TensorRTConfig(max_batch=8))

TensorRT is optional (`pip install act[tensorrt]`) and only needed here; nothing else in act imports it. Where a
flag is chosen, the comment names the TensorRT documentation page that says why:
  [API-B]  Python API, Builder / NetworkDefinitionCreationFlag:
           https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  [API-C]  Python API, IBuilderConfig (flags, memory pools, timing cache, DLA):
           https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  [EQ]     Developer guide, Explicit Quantization:
           https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
  [DLA]    Developer guide, Working with DLA / GPU Fallback Mode (DLA is absent from TensorRT 11.0 and 11.1):
           https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-runtime-configuration.html
  [TC]     Developer guide, Timing cache:
           https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html#timing-cache

File layout (what Ultralytics' own exporter writes, ultralytics/utils/export/engine.py `onnx2engine`, and what its
TensorRT backend reads, ultralytics/nn/backends/base.py `engine_header`): a 4-byte little-endian length n, n bytes
of JSON metadata (task, names, stride, imgsz, kpt_shape, ...; "dla" for a DLA engine), then the serialized engine.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from act.core.config import TensorRTConfig
from act.core.errors import ActError
from act.core.optional_deps import INSTALL_HINT, TensorRTMissing, import_tensorrt  # noqa: F401 (re-exported)


# ---- the .engine file: Ultralytics' metadata header + serialized engine ---------------------------------------------
def write_engine(path: Path, engine: bytes, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write `engine` with Ultralytics' header, atomically. Mirrors ultralytics `onnx2engine`: the length is that of
    `json.dumps(metadata)` (ASCII, so characters == bytes), 4 bytes little-endian."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if metadata is not None:
                meta = json.dumps(metadata)  # ensure_ascii: len(meta) is its length in bytes
                f.write(len(meta).to_bytes(4, byteorder="little", signed=True))
                f.write(meta.encode())
            f.write(bytes(engine))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_engine_header(path: Path) -> Tuple[int, Dict[str, Any]]:
    """(offset of the engine bytes, metadata) of an .engine file; (0, {}) when it has no header. Same rule as
    Ultralytics' reader: a length that fits in the file followed by valid JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(4), byteorder="little")
        size = f.seek(0, 2)
        if 0 < n <= size - 4:
            f.seek(4)
            try:
                return 4 + n, json.loads(f.read(n))
            except ValueError:
                pass
    return 0, {}


def metadata_from_onnx(onnx_path: Path) -> Dict[str, Any]:
    """The Ultralytics metadata act wrote into the ONNX (strings there) with their Python types back."""
    import onnx

    from act.deploy.onnx_hygiene import metadata_of

    return metadata_of(onnx.load(str(onnx_path), load_external_data=False))


# ---- building --------------------------------------------------------------------------------------------------------
def _profile_shapes(shape, cfg) -> Optional[Tuple[tuple, tuple, tuple]]:
    """min/opt/max input shapes when the batch (or anything) is dynamic (-1); None for a static input."""
    dims = list(shape)
    if all(d != -1 for d in dims):
        return None
    if any(d == -1 for d in dims[1:]):
        raise ActError(f"the ONNX input has dynamic dimensions besides the batch ({dims}); export with a fixed imgsz")
    rest = tuple(dims[1:])
    return (cfg.min_batch, *rest), (cfg.opt_batch, *rest), (cfg.max_batch, *rest)


def build_engine(onnx_path: Path, engine_path: Path, cfg=None, metadata: Optional[Dict[str, Any]] = None,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Build a TensorRT engine from a Q/DQ ONNX and write it with the Ultralytics header. `cfg`: an
    act.core.config.TensorRTConfig (defaults if None). metadata: default the ONNX's own. Returns a report dict."""
    cfg = cfg or TensorRTConfig()
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ActError(f"ONNX file not found: {onnx_path}")
    meta = dict(metadata_from_onnx(onnx_path) if metadata is None else metadata)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)

    # Strongly typed network: tensor types come from the graph (the Q/DQ say what is INT8), no precision flags.
    # [API-B] NetworkDefinitionCreationFlag.STRONGLY_TYPED; [EQ] "Use explicit quantization with Strong Typing.
    # Precision-control build flags are not required and should not be specified." (TensorRT >= 9; always on in 11.)
    flag_enum = trt.NetworkDefinitionCreationFlag
    has_strong = hasattr(flag_enum, "STRONGLY_TYPED")
    if cfg.strongly_typed is True and not has_strong:
        raise ActError(f"export.tensorrt.strongly_typed: true, but TensorRT {trt.__version__} has no strongly typed "
                       f"networks (TensorRT >= 9 has); set it to auto or false")
    strongly = has_strong and cfg.strongly_typed in (True, "auto")
    flags = 0
    if strongly:
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    elif hasattr(flag_enum, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)  # [API-B] required before TensorRT 10 (ignored since)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ActError(f"TensorRT could not parse {onnx_path}: {errors or 'no detail'}")

    config = builder.create_builder_config()
    if not strongly:
        # Weakly typed (TensorRT < 9, or strongly_typed: false): INT8 must be allowed for the Q/DQ layers to run
        # INT8 ([EQ]: explicit quantization needs the INT8 flag in weakly typed mode), FP16 lets the float layers
        # (decode, attention) run in half precision ([API-C] BuilderFlag.INT8 / FP16).
        config.set_flag(trt.BuilderFlag.INT8)
        if cfg.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    if cfg.workspace_gib:
        # [API-C] set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes) (replaces max_workspace_size)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * (1 << 30)))
    if cfg.optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(cfg.optimization_level)  # [API-C] 0..5, default 3

    inp = network.get_input(0)
    shapes = _profile_shapes(tuple(inp.shape), cfg)
    if shapes is not None:
        # [API-B] Builder.create_optimization_profile; IOptimizationProfile.set_shape(input, min, opt, max)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
        meta.setdefault("args", {})["dynamic"] = True
        meta["batch"] = cfg.max_batch
    elif isinstance(meta.get("args"), dict):
        meta["args"]["dynamic"] = False

    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    if cache_path is not None and not cache_path.is_absolute():
        cache_path = engine_path.parent / cache_path
    if cache_path is not None:
        # [TC] a timing cache reused across builds skips re-timing the same layer configurations;
        # [API-C] create_timing_cache(serialized or b"") / set_timing_cache(cache, ignore_mismatch)
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    if cfg.dla_core is not None:
        # [DLA] run on a DLA core; layers DLA cannot run fall back to the GPU with BuilderFlag.GPU_FALLBACK
        if trt.__version__.startswith(("11.0.", "11.1.")):
            raise ActError(f"export.tensorrt.dla_core: TensorRT {trt.__version__} has no DLA support (11.0 and 11.1 "
                           f"dropped it); build with TensorRT 10.x")
        if getattr(builder, "num_DLA_cores", 0) <= cfg.dla_core:
            raise ActError(f"export.tensorrt.dla_core: {cfg.dla_core}, but this device has "
                           f"{getattr(builder, 'num_DLA_cores', 0)} DLA cores (DLA exists on Jetson / DRIVE only)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(cfg.dla_core)
        if cfg.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        meta["dla"] = str(cfg.dla_core)  # Ultralytics' backend sets runtime.DLA_core from it

    log(f"act: building TensorRT {trt.__version__} engine from {onnx_path} ("
        f"{'strongly typed' if strongly else 'INT8' + (' + FP16' if cfg.fp16 else '') + ' flags'}"
        f"{', batch ' + '/'.join(str(s[0]) for s in shapes) if shapes else ''})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ActError("TensorRT engine build failed (see the TensorRT messages above)")
    if cache_path is not None:
        timing = config.get_timing_cache()
        if timing is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(memoryview(timing.serialize())))
    write_engine(engine_path, bytes(memoryview(serialized)), meta)
    return {
        "path": str(engine_path),
        "tensorrt": trt.__version__,
        "strongly_typed": strongly,
        "fp16": bool(not strongly and cfg.fp16),
        "profile": [list(s) for s in shapes] if shapes else None,
        "workspace_gib": cfg.workspace_gib,
        "timing_cache": str(cache_path) if cache_path else None,
        "dla_core": cfg.dla_core,
        "bytes": engine_path.stat().st_size,
    }


def torch_dtype(trt, dt):
    """The torch dtype of a TensorRT tensor dtype."""
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dt]


def engine_latency(engine_path: Path, batches=None, warmup: int = 20, iters: int = 100, log=print) -> Dict[str, Any]:
    """Time a TensorRT engine alone: execute_async_v3 on one CUDA stream, CUDA events around each run, the median of
    `iters` runs after `warmup`, per batch (a static engine: its own batch). Needs an NVIDIA GPU (torch CUDA tensors
    hold the bindings)."""
    import torch

    trt = import_tensorrt("timing a TensorRT engine")
    if not torch.cuda.is_available():
        raise ActError("timing a TensorRT engine: no CUDA GPU visible to torch")
    offset, meta = read_engine_header(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if meta.get("dla") is not None:
        runtime.DLA_core = int(meta["dla"])
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes()[offset:])
    if engine is None:
        raise ActError(f"TensorRT {trt.__version__} could not deserialize {engine_path}")
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
            log(f"static engine of batch {shape[0]}; timing that batch only")
        batches = [shape[0]]
    stream = torch.cuda.Stream()
    rows = []
    for b in batches:
        if dynamic:
            if not lo[0] <= b <= hi[0]:
                log(f"batch {b} is outside the profile [{lo[0]}, {hi[0]}]; skipped")
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
                    raise ActError("TensorRT: execute_async_v3 failed")
                if i >= warmup:
                    times.append(start.elapsed_time(end))
        med = statistics.median(times)
        rows.append({"batch": b, "median_ms": round(med, 4), "p90_ms": round(sorted(times)[int(0.9 * len(times))], 4),
                     "min_ms": round(min(times), 4), "images_per_s": round(1000.0 * b / med, 1), "iters": iters})
        log(f"batch {b:>3}: median {med:.3f} ms  ({rows[-1]['images_per_s']:.0f} img/s, p90 {rows[-1]['p90_ms']} ms)")
    return {"engine": str(engine_path), "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "input": inp, "shape": list(shape), "warmup": warmup, "rows": rows}
