"""The export and report sections: ONNX, the deployment target, parity bounds, TensorRT and OpenVINO."""

from __future__ import annotations

from typing import Dict, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from act.core.config.sections import _Section


class ReportConfig(_Section):
    enabled: bool = True
    latency_runs: int = Field(20, ge=0, description="timed batch-1 runs per model and runtime (median): onnxruntime "
                                                    "CPU, and OpenVINO CPU (LATENCY hint; plus THROUGHPUT-hint "
                                                    "images/s) where installed; 0: skip")
    teacher_onnx: bool = Field(True, description="export the teacher to ONNX for its size and latency")


class TensorRTConfig(_Section):
    """`act export --engine` / export.tensorrt: TensorRT engine from the Q/DQ ONNX (act.deploy.tensorrt)."""

    enabled: bool = Field(False, description="build student.engine after the ONNX export of act compress / ptq")
    strongly_typed: Union[Literal["auto"], bool] = Field(
        "auto", description="auto: a strongly typed network where TensorRT supports it (>= 9), else INT8+FP16 flags"
    )
    fp16: bool = Field(True, description="weakly typed builds only: float layers (decode, attention) in FP16")
    min_batch: int = Field(1, ge=1, description="optimization profile of a dynamic-batch ONNX")
    opt_batch: int = Field(1, ge=1)
    max_batch: int = Field(8, ge=1)
    workspace_gib: Optional[float] = Field(4.0, gt=0, description="workspace memory pool limit; null: TensorRT's")
    timing_cache: Optional[str] = Field(
        "timing.cache", description="timing cache file reused across builds (relative: next to the engine); null: off"
    )
    dla_core: Optional[int] = Field(None, ge=0, description="DLA core (Jetson/DRIVE), layers DLA lacks on the GPU")
    gpu_fallback: bool = True
    optimization_level: Optional[int] = Field(None, ge=0, le=5, description="builder optimization level (default 3)")

    @model_validator(mode="after")
    def _batches(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch (got {self.min_batch}, {self.opt_batch}, "
                             f"{self.max_batch})")
        return self


class OpenVINOConfig(_Section):
    """The OpenVINO IR (`student_openvino_model/`, Ultralytics' layout) and the checks made in OpenVINO (act.deploy.openvino).
    OpenVINO's CPU plugin fuses Q/DQ into INT8 kernels, as TensorRT does: docs/deployment.md."""

    enabled: Union[Literal["auto"], bool] = Field(
        "auto", description="write student_openvino_model/ after the ONNX export; auto: when export.target is cpu "
                            "and the openvino package is installed")
    parity_tolerance: Dict[str, float] = Field(
        default_factory=lambda: {"box": 0.05, "cls": 0.1, "kpt": 0.05},
        description="per output branch: the largest relative L2 error of OpenVINO's outputs against the torch "
                    "student (see export.branch_tolerance)")
    precision: Literal["f32", "auto"] = Field(
        "f32", description="float precision of the parity check: f32 (INT8 kernels, float layers in f32: the model, "
                           "not the CPU's bf16 choice); auto: the CPU's default (bf16 on AVX512-BF16 / AMX CPUs), "
                           "as Ultralytics runs it")

    @field_validator("parity_tolerance")
    @classmethod
    def _branches(cls, v):
        return _check_branch_tolerance(v)


def _check_branch_tolerance(v: Dict[str, float]) -> Dict[str, float]:
    bad = sorted(set(v) - set(OUTPUT_BRANCHES))
    if bad:
        raise ValueError(f"unknown output branch {bad[0]!r}; expected {', '.join(OUTPUT_BRANCHES)}")
    if any(not (t > 0) for t in v.values()):
        raise ValueError("expected tolerances > 0")
    return v


OUTPUT_BRANCHES = ("box", "cls", "kpt")  # the decoded output's channel groups (act.core.family: output_branches)


class ExportConfig(_Section):
    target: Literal["tensorrt", "cpu"] = Field(
        "tensorrt", description="what the INT8 model is made for. tensorrt: symmetric int8 everywhere, full-range "
                                "weights (TensorRT's explicit quantization). cpu: x86 CPUs through OpenVINO or "
                                "onnxruntime's fused INT8 kernels: activations stored as uint8 with zero point 128 "
                                "(the same values), weights within 7 bits (quant.weight.range auto), OpenVINO IR")
    onnx: bool = True
    opset: int = Field(17, ge=13, le=21)
    dynamic: bool = False
    batch: int = Field(1, ge=1)
    simplify: bool = True
    parity_images: int = Field(4, ge=1)
    # Rounding flips alone (a value on a rounding boundary lands one step apart in onnxruntime and torch, and the
    # flip travels downstream) measured 0.004-0.014 relative L2 on yolo11n-pose (96-640 px, PTQ and QAT students);
    # 1% failed healthy exports. Gross export mistakes (layout, decode, a missing branch) are far above 3%; subtle
    # placement problems (one conv's input left float moves it by ~0.004) are the Q/DQ linter's job, not parity's.
    parity_tolerance: float = Field(
        3e-2, gt=0, description="max relative L2 error of ONNX vs torch outputs (rounding flips only)"
    )
    # Per output branch (box, class scores as logits, keypoints; the family says which channels): a dead class branch
    # is 1 of 56 channels and hides in the whole-output error. Rounding flips alone measured, yolo11n-pose 160-640 px:
    # box 0.010-0.020, cls logits 0.019-0.02, kpt 0.006-0.012 (onnxruntime and OpenVINO); the OpenVINO faults this
    # check exists for: cls logits 0.22-0.25, box 0.097-0.10, kpt 0.05-0.06 (docs/deployment.md).
    branch_tolerance: Dict[str, float] = Field(
        default_factory=lambda: {"box": 0.05, "cls": 0.1, "kpt": 0.05},
        description="per output branch: the largest relative L2 error of onnxruntime's outputs against the torch "
                    "student")
    openvino: OpenVINOConfig = Field(default_factory=OpenVINOConfig)
    latency_runs: int = Field(
        20, ge=0, description="staged runs: time each stage's ONNX this many times (median) in onnxruntime on CPU, "
                              "and in OpenVINO on CPU where installed; 0: skip")
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)

    @field_validator("branch_tolerance")
    @classmethod
    def _branches(cls, v):
        return _check_branch_tolerance(v)

    @property
    def activation_dtype(self) -> str:
        """How activation Q/DQ are stored: int8 (zero point 0) for TensorRT, uint8 (zero point 128) for CPUs."""
        return "uint8" if self.target == "cpu" else "int8"
