"""OpenVINO: act's INT8 model as a CPU deployment runtime runs it (the CPU plugin fuses Q/DQ into INT8 kernels, as
TensorRT does on a GPU), written in Ultralytics' layout, run for parity, and timed.

    write_ir("runs/exp/student.onnx", "runs/exp/student_openvino_model")   # .xml, .bin, metadata.yaml
    YOLO("runs/exp/student_openvino_model")                               # Ultralytics loads and validates it

The IR is converted from act's Q/DQ ONNX, so its INT8 ranges are the ones act trained (no re-calibration). Activation
Q/DQ go in as uint8 with zero point 128 (act.deploy.onnx_hygiene.activations_as_uint8: the same values), since OpenVINO's
CPU plugin computes signed-int8 activations next to a Concat wrongly; on CPUs without VNNI the weights must also stay
within 7 bits (quant.weight.range: int7, export.target: cpu). Why, measured: docs/deployment.md.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from act.core.errors import ActError
from act.core.optional_deps import import_openvino

IR_NAME = "student"  # student_openvino_model/student.xml (.bin), as Ultralytics names its IR after the .pt


def ir_folder(onnx_path: Path) -> Path:
    """Where the IR of an ONNX goes: `<stem>_openvino_model/` beside it (Ultralytics' name for OpenVINO exports)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}_openvino_model")


def write_ir(onnx_path: Path, folder: Optional[Path] = None) -> Path:
    """OpenVINO IR (`student.xml` + `.bin`, FP32 float parts) of a Q/DQ ONNX, with Ultralytics' `metadata.yaml` (from
    the ONNX's metadata), in `folder` (default: ir_folder(onnx_path)). Returns the .xml path. Written into a temporary
    folder first, then moved into place: a failed conversion leaves a previous IR intact."""
    import shutil

    import onnx
    import yaml

    from act.deploy.onnx_hygiene import activations_as_uint8, metadata_of

    ov = import_openvino("the OpenVINO export")
    onnx_path = Path(onnx_path)
    folder = Path(folder) if folder else ir_folder(onnx_path)
    proto = onnx.load(str(onnx_path))
    meta = metadata_of(proto)
    activations_as_uint8(proto)  # a no-op for an export.target cpu ONNX (already uint8)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rendered = tmp / "rendered.onnx"
        onnx.save(proto, str(rendered))
        model = ov.convert_model(str(rendered))
        rendered.unlink()
        model.set_rt_info("YOLO", ["model_info", "model_type"])
        ov.save_model(model, str(tmp / f"{IR_NAME}.xml"), compress_to_fp16=False)  # INT8 stays INT8; floats FP32
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ActError):
            raise
        raise ActError(f"OpenVINO could not convert {onnx_path}: {type(e).__name__}: {e}") from e
    return folder / f"{IR_NAME}.xml"


def model_file(path: Path) -> Path:
    """An IR folder's .xml, or the file itself (.xml, .onnx)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.xml"))
        if not found:
            raise ActError(f"{path} holds no OpenVINO IR (.xml)")
        return found[0]
    return path


def compile_model(path: Path, precision: str = "auto", hint: str = "LATENCY"):
    """A CPU compiled model. precision: f32 (float layers in FP32; INT8 layers unchanged) or auto (the plugin's
    default: bf16 on CPUs with AVX512-BF16 / AMX). Returns (compiled model, the precision it runs)."""
    ov = import_openvino("running the OpenVINO model")
    core = ov.Core()
    config: Dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    model = core.read_model(str(model_file(path)))
    try:
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError:
        if precision != "f32":
            raise
        # OpenVINO 2026.4 cannot compile some small-input models' attention Softmax in f32 (a plugin limitation, not
        # the model's): run them at the CPU's own precision and say so
        config.pop("INFERENCE_PRECISION_HINT")
        compiled = core.compile_model(model, "CPU", config)
        precision = "auto (f32 failed to compile)"
    return compiled, precision


def runtime_precision(compiled) -> str:
    """The float precision the compiled model runs (f32, bf16, f16)."""
    t = compiled.get_property("INFERENCE_PRECISION_HINT")
    return t.to_string() if hasattr(t, "to_string") else str(t)


def outputs(path: Path, images, precision: str = "f32"):
    """The model's first output on `images` (N, 3, H, W, float in [0, 1]), one image at a time (the IR has batch 1),
    and the precision it ran at."""
    compiled, used = compile_model(path, precision)
    x = images.float().cpu().numpy() if hasattr(images, "numpy") else np.asarray(images, np.float32)
    out = np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))])
    return out, {"precision": used, "runtime_precision": runtime_precision(compiled)}


def latency(path: Path, runs: int = 30, warmup: int = 5, precision: str = "auto") -> Dict[str, Any]:
    """OpenVINO CPU speed of a model (.onnx or IR) at its own input shape, on random input:
    latency: PERFORMANCE_HINT LATENCY, batch 1, median (and min) of `runs` synchronous inferences after `warmup`;
    throughput: PERFORMANCE_HINT THROUGHPUT, as many parallel infer requests as the plugin suggests, images/s of
    2 x `runs` inferences after one warm-up round. Float layers run at the CPU's default precision, as deployed
    (precision auto), or in FP32 (f32)."""
    ov = import_openvino("timing the OpenVINO model")
    compiled, _ = compile_model(path, precision, "LATENCY")
    shape = [d if d > 0 else (1 if i == 0 else 640) for i, d in enumerate(compiled.input(0).get_partial_shape()
                                                                                .get_min_shape())]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({0: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        request.infer({0: x})
        times.append((time.perf_counter() - t) * 1000)
    out: Dict[str, Any] = {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
                           "runs": runs, "batch": shape[0], "imgsz": shape[2:], "hint": "LATENCY",
                           "precision": runtime_precision(compiled), "openvino": ov.__version__}
    compiled, _ = compile_model(path, precision, "THROUGHPUT")
    queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    for _ in range(len(queue)):
        queue.start_async({0: x})
    queue.wait_all()
    n, t0 = max(2 * runs, len(queue)), time.perf_counter()
    for _ in range(n):
        queue.start_async({0: x})
    queue.wait_all()
    out["throughput_images_per_s"] = round(n * shape[0] / (time.perf_counter() - t0), 2)
    out["throughput_requests"] = len(queue)
    return out


def latency_of_onnx(onnx_path: Path, runs: int = 20, warmup: int = 5, precision: str = "auto") -> Dict[str, Any]:
    """`latency` of what OpenVINO deploys from a Q/DQ or float ONNX: its IR (`<stem>_openvino_model/` if written,
    else converted into a temporary folder)."""
    import shutil
    import tempfile

    folder = ir_folder(onnx_path)
    if (folder / f"{IR_NAME}.xml").is_file() and folder.stat().st_mtime >= Path(onnx_path).stat().st_mtime:
        return latency(folder, runs, warmup, precision)
    tmp = Path(tempfile.mkdtemp(prefix="act_openvino_"))
    try:
        return latency(write_ir(onnx_path, tmp / "ir"), runs, warmup, precision)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
