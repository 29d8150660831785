"""The sections of a run config: one pydantic model each, unknown keys forbidden."""

from __future__ import annotations

from typing import List, Literal, Optional, Tuple, Union


from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Annotated

from act.core.registry import CALIBRATORS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The model to compress. `teacher` is a name from `teachers/registry.yaml`, a path to an Ultralytics `.pt`, or
    an Ultralytics model yaml (random weights, for structural experiments). `family` names the model family that
    loads it (act.core.family: built-in `ultralytics-yolo`, or one registered with act.core.family.register_family)."""

    teacher: str = Field(description="teacher name (e.g. yolo11n-pose), .pt path, or Ultralytics model .yaml")
    family: str = Field("auto", description="model family: auto (the teacher registry entry's family, else "
                                             "ultralytics-yolo) or a registered family name (act.core.family)")
    task: Literal["auto", "pose", "detect"] = "auto"


class AugmentConfig(_Section):
    """Augmentation of the unlabeled images. Teacher and student see the same augmented view (the teacher labels it
    by its outputs), so any view is a valid training sample: a mosaic of four images is a new one."""

    flip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    scale: Tuple[float, float] = Field((0.75, 1.25), description="random resize range before letterbox (a mosaic's "
                                                                  "zoom range)")
    mosaic: float = Field(0.0, ge=0.0, le=1.0, description="probability that a sample is a 2x2 mosaic of four pool "
                                                           "images (Ultralytics' training mosaic), zoomed and shifted")
    translate: float = Field(0.1, ge=0.0, le=0.5, description="a mosaic's random shift, a share of imgsz")
    hsv: Tuple[float, float, float] = Field((0.0, 0.0, 0.0), description="random hue / saturation / value gains "
                                            "(Ultralytics' hsv_h, hsv_s, hsv_v; its training default 0.015, 0.7, 0.4)")

    @field_validator("hsv")
    @classmethod
    def _hsv_range(cls, v):
        if not all(0 <= g <= 1 for g in v):
            raise ValueError("expected three gains in [0, 1] (hue, saturation, value)")
        return v

    @field_validator("scale")
    @classmethod
    def _scale_ordered(cls, v):
        if not (0 < v[0] <= v[1]):
            raise ValueError("expected [low, high] with 0 < low <= high")
        return v


class DataConfig(_Section):
    """Unlabeled images for distillation: a folder, a .txt list of paths, an Ultralytics data yaml (its train split),
    or `pkg:PACKAGE/FOLDER` for images shipped inside an installed package."""

    train: str
    imgsz: int = Field(640, ge=32, le=4096)
    batch_size: int = Field(16, ge=1)
    workers: Union[int, Literal["auto"]] = Field(
        "auto", description="loader processes; 'auto': the CPU cores this process may use (per GPU under DDP), "
                            "at most 16")
    augment: Union[AugmentConfig, bool] = True
    max_images: Optional[int] = Field(None, ge=1, description="use at most this many images of the pool")
    cache: Union[bool, Literal["ram", "none"]] = Field(
        False, description="'ram' (or true): decode the pool once, before training, and keep it in memory, shared "
                           "by the loader workers (small pools; see cache_max_gb)")
    cache_max_gb: float = Field(8.0, gt=0, description="data.cache=ram: fail before work if the pool needs more")
    pin_memory: Optional[bool] = Field(None, description="page-locked batches for fast copies; default: on CUDA")
    prefetch_factor: int = Field(4, ge=1, description="batches each loader worker prepares ahead")
    persistent_workers: bool = Field(True, description="keep loader workers alive across passes over the pool")

    @field_validator("workers")
    @classmethod
    def _workers_nonneg(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("expected 'auto' or a number >= 0")
        return v

    @property
    def cache_ram(self) -> bool:
        return self.cache is True or self.cache == "ram"

    @field_validator("imgsz")
    @classmethod
    def _stride_multiple(cls, v):
        if v % 32:
            raise ValueError("expected a multiple of 32 (the model's largest stride)")
        return v

    @property
    def augmentation(self) -> Optional[AugmentConfig]:
        if self.augment is True:
            return AugmentConfig()
        return self.augment or None


WEIGHT_RANGES = {"int8": 127, "int7": 63}  # quant.weight.range -> the largest weight integer


class WeightQuantConfig(_Section):
    bits: Literal[8] = 8
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    range: Literal["auto", "int8", "int7"] = Field(
        "auto", description="int8: weight integers in [-127, 127] (TensorRT); int7: within [-63, 63], scale = abs-max "
                            "/ 63, still stored as int8: CPUs without VNNI sum u8 x s8 products in pairs into 16 "
                            "bits, which saturates with 8-bit weights (OpenVINO, onnxruntime); auto: what "
                            "export.target needs (int7 for cpu, int8 for tensorrt)")

    @property
    def max_int(self) -> int:
        """The largest weight integer; 'auto' (a config not resolved against export.target) means int8."""
        return WEIGHT_RANGES.get(self.range, 127)


class ActivationQuantConfig(_Section):
    bits: Literal[8] = 8
    ema_rate: float = Field(0.9, ge=0.0, lt=1.0, description="moving-average rate of the batch abs-max")
    pact: bool = Field(True, description="learn a clip alpha (PACT) before quantizing")
    alpha_init: Union[Literal["auto"], float] = Field(
        "auto", description="'auto': the calibrated abs-max; or a fixed starting clip"
    )
    alpha_lr: float = Field(1e-3, ge=0, description="learning rate of the PACT alphas")
    alpha_weight_decay: float = Field(0.0, ge=0)


class TargetConfig(_Section):
    """When a student is good enough: `metric` >= `min` and/or `metric` >= (the teacher's value - `max_drop`).
    metric 'auto': fidelity_pose_map50_95 for pose, fidelity_box_map50_95 for detect (label-free; the teacher's own
    value is 1.0). Any key of the run's eval results works (e.g. pose_map50_95 with eval.data)."""

    metric: str = "auto"
    min: Optional[float] = Field(None, description="absolute: the metric must reach this")
    max_drop: Optional[float] = Field(None, ge=0, description="relative: at most this below the teacher's value")

    @model_validator(mode="after")
    def _one_bound(self):
        if self.min is None and self.max_drop is None:
            raise ValueError("give min (absolute) and/or max_drop (below the teacher)")
        return self


class AutoSkipConfig(_Section):
    """Budget of `quant.skip: auto`: keep in float the layers whose float copy gains the most (sensitivity ranking),
    at most `max_layers` of them; with a `target`, only as many as needed to reach it (measured on the analysis
    images with every chosen layer in float at once)."""

    max_layers: int = Field(3, ge=0, description="at most this many layers stay in float")
    target: Optional[TargetConfig] = Field(None, description="stop adding layers once the student reaches this; "
                                                             "metric e.g. fidelity_snr_db_mean, fidelity_pose_map50_95")
    min_gain: float = Field(0.0, description="only layers whose float copy gains more than this (ranking score)")


class AnalyzeConfig(_Section):
    """`act analyze` (and `quant.skip: auto`): per-layer quantization sensitivity, label-free."""

    images: int = Field(16, ge=1, description="held-out images the errors are measured on (the fidelity slice)")
    calib_images: Optional[int] = Field(None, ge=1, description="calibration images; default ptq.num_images")
    layers: List[str] = Field(default_factory=list, description="only these quantized layers (globs / 're:'); "
                                                                 "default all")
    rank_by: Literal["snr_db", "fidelity"] = Field(
        "snr_db", description="snr_db: mean head SNR over the distillation nodes; fidelity: detection fidelity mAP")
    fidelity_map: bool = Field(False, description="also score every layer's detections against the teacher's (COCO "
                                                   "mAP; slower, and noisy on few images)")
    map_top_k: int = Field(3, ge=0, description="with eval.data: labeled mAP of the top-k layers left in float")
    batch_size: Optional[int] = Field(None, ge=1, description="default: eval.batch_size")


# a calibrator's name: one registered in act.core.registry.CALIBRATORS (act.blocks.quant.calibrators declares them)
Calibrator = Annotated[str, AfterValidator(CALIBRATORS.check)]


class PTQCandidate(_Section):
    calibrator: Calibrator
    percentile: float = Field(99.99, gt=0, le=100)


def _default_search() -> List[PTQCandidate]:
    return [PTQCandidate(calibrator="percentile", percentile=99.99),
            PTQCandidate(calibrator="percentile", percentile=99.999),
            PTQCandidate(calibrator="mse"), PTQCandidate(calibrator="entropy")]


class PruneTarget(_Section):
    """A speed/size target that asks for a pruning stage."""

    macs_ratio: Optional[float] = Field(None, gt=0, le=1, description="student MACs / teacher MACs at most")
    params_ratio: Optional[float] = Field(None, gt=0, le=1, description="student params / teacher params at most")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.macs_ratio is None) == (self.params_ratio is None):
            raise ValueError("expected exactly one of macs_ratio, params_ratio")
        return self


class AutoConfig(_Section):
    """strategy: auto. A PTQ probe (calibrators in `search`, histograms collected once); if its best candidate meets
    `target` the run stops there; else distillation QAT from that PTQ state, stopping early at an eval where
    `qat_target` (default: `target`) is met."""

    target: TargetConfig = Field(default_factory=lambda: TargetConfig(min=0.9), description="PTQ is enough when met")
    qat_target: Optional[TargetConfig] = Field(None, description="QAT early stop; default: target")
    search: List[PTQCandidate] = Field(default_factory=_default_search, min_length=1)
    probe_images: Optional[int] = Field(None, ge=1, description="calibration images of the probe; default "
                                                                "ptq.num_images")
    prune: Optional[PruneTarget] = Field(None, description="speed/size target: adds a pruning stage")
    latency_ms: Optional[float] = Field(
        None, gt=0, description="budget: batch-1 latency at most this (ms, frontier.runtime on this machine). The run "
                                "measures the frontier (frontier: section) and delivers its most accurate point "
                                "within the budget (act.orchestrate.budget)")
    macs_ratio: Optional[float] = Field(None, gt=0, le=1, description="budget: MACs at most this x the teacher's at "
                                                                      "data.imgsz (as latency_ms)")
    max_drop: Optional[float] = Field(
        None, ge=0, description="with a budget: accuracy at most this below the teacher's at data.imgsz (labeled "
                                "mAP with eval.data, else label-free fidelity); a budget no point meets within it "
                                "fails with the closest points")

    @property
    def budget(self) -> bool:
        return self.latency_ms is not None or self.macs_ratio is not None

    @model_validator(mode="after")
    def _budget_or_prune(self):
        if self.budget and self.prune is not None:
            raise ValueError("give either prune (prune to this size) or a budget (latency_ms / macs_ratio: the "
                             "frontier's best point within it), not both")
        if self.max_drop is not None and not self.budget:
            raise ValueError("max_drop bounds the accuracy of a budget's choice: give latency_ms or macs_ratio too "
                             "(for PTQ / QAT accuracy targets use target.max_drop)")
        return self

class PlacementConfig(_Section):
    """Where quantizers go besides every conv input and weight, and which share one scale (act.blocks.quant.placement)."""

    preset: Literal["auto", "tensorrt", "conv"] = Field(
        "auto", description="auto: the model family's default (tensorrt for Ultralytics); tensorrt: the rules below "
                            "that let TensorRT fuse without reformat layers; conv: conv inputs and weights only"
    )
    concat: Optional[bool] = Field(None, description="one shared scale for every Concat input and its readers")
    residual_add: Optional[bool] = Field(None, description="quantize both inputs of residual Adds")
    maxpool: Optional[bool] = Field(None, description="MaxPool input and output share one scale (in SPPF every pool "
                                                     "output is also a Concat input, so concat implies it)")
    upsample: Optional[bool] = Field(None, description="Upsample input quantized, sharing the scale of its output")
    fanout: Optional[bool] = Field(None, description="quantizers of one tensor are one quantizer")


class QuantConfig(_Section):
    enabled: bool = True
    weight: WeightQuantConfig = Field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = Field(default_factory=ActivationQuantConfig)
    skip: Union[Literal["auto"], List[str]] = Field(
        default_factory=list, description="module-name globs (or 're:' regexes) kept in float; 'auto': the most "
                                          "sensitive layers by `act analyze`, within quant.auto_skip's budget")
    auto_skip: AutoSkipConfig = Field(default_factory=AutoSkipConfig, description="budget of quant.skip: auto")
    calibrator: str = Field(
        "search", description="how the activation ranges start before distillation: search: each PTQ calibrator of "
                              "auto.search on ptq.num_images images, the best by label-free fidelity (eval.metric if "
                              "it is a fidelity key, else the task's fidelity mAP); a calibrator name: that one (ptq.* "
                              "settings); ema: the moving average over calib_batches training batches. Ignored with "
                              "init_from")
    calib_batches: int = Field(8, ge=0, description="batches that initialise the moving averages (calibrator: ema)")
    init_from: Optional[str] = Field(
        None, description="an act checkpoint (e.g. an `act ptq` output's ptq.pt) whose calibrated activation ranges "
                          "start the moving averages and PACT alphas, instead of calibrating on calib_batches"
    )
    quantize_linear: bool = True
    placement: PlacementConfig = Field(default_factory=PlacementConfig)

    @field_validator("calibrator")
    @classmethod
    def _calibrator(cls, v):
        return v if v in ("search", "ema") else CALIBRATORS.check(v)


class NanPolicyConfig(_Section):
    """What to do when a step's loss or gradient is NaN/Inf (see docs/reliability.md): skip it; after
    `max_consecutive` in a row restore the last good state and multiply the learning rates by `lr_factor`; stop
    (exit 4, best.pt kept) when more than `max_restores` restores or `max_skipped` skipped steps would be needed."""

    max_consecutive: int = Field(3, ge=1, description="skipped steps in a row that trigger a restore")
    lr_factor: float = Field(0.5, gt=0, le=1, description="learning-rate multiplier applied at each restore")
    max_restores: int = Field(3, ge=0, description="restores allowed before the run stops")
    max_skipped: Optional[int] = Field(None, ge=0, description="skipped steps allowed in total (None: no limit)")


class TrainConfig(_Section):
    iterations: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_iters: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    grad_clip: Optional[float] = Field(10.0, gt=0)
    amp: Literal["none", "bf16", "fp16"] = "none"
    ema: Optional[float] = Field(
        None, gt=0, lt=1, description="weight EMA of the student with this decay (e.g. 0.999), ramped up as "
                                     "decay * (1 - exp(-step / ema_tau)): evaluated, kept as best.pt and exported "
                                     "instead of the raw student; null: off")
    ema_tau: float = Field(200.0, gt=0, description="iterations over which the EMA decay ramps up")
    seed: int = 0
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:N'")
    log_every: int = Field(10, ge=1, description="log losses (a device sync) every N iterations only")
    checkpoint_every: int = Field(100, ge=1)
    nan_policy: NanPolicyConfig = Field(default_factory=NanPolicyConfig)
    # speed (docs/scale.md)
    teacher_amp: Optional[Literal["none", "bf16", "fp16"]] = Field(
        None, description="autocast dtype of the teacher's forward (no grad); default: as train.amp")
    channels_last: Union[bool, Literal["auto"]] = Field(
        "auto", description="NHWC memory format for teacher, student and batches; auto (default): on CUDA "
                            "(cuDNN's NHWC kernels, no layout transposes), never on the CPU")
    compile: Union[bool, Literal["quantizers", "auto"]] = Field(
        "auto", description="auto (default): the activation quantizers' fused kernels (act.blocks.quant.fused) on CUDA "
                            "where Triton is installed (hand-written, nothing to compile), else off; 'quantizers': "
                            "those kernels everywhere (elsewhere built by torch.compile, ~30 s at start); true: "
                            "torch.compile the student's forward; false: eager ops")
    cuda_graph: Union[bool, Literal["auto"]] = Field(
        "auto", description="capture the whole step (teacher, student forward/backward, optimizer) as one CUDA "
                            "graph and replay it (docs/scale.md). auto (default) / true: where it can run (one CUDA "
                            "process, no train.compile=true, no fp16, a fixed batch shape), else eager with a "
                            "message (once per process); false: eager")
    cuda_graph_warmup: int = Field(3, ge=1, description="eager steps before the capture (and after each "
                                                        "re-capture: a pruning step, a restore)")
    find_unused_parameters: bool = Field(True, description="DDP: allow parameters that get no gradient (e.g. the "
                                                          "DFL decode conv past the distilled nodes)")

    @model_validator(mode="after")
    def _length(self):
        if self.iterations is None and self.epochs is None:
            self.iterations = 1000
        if self.iterations is not None and self.epochs is not None:
            raise ValueError("set either iterations or epochs, not both")
        return self


class PTQConfig(_Section):
    """`act ptq`: activation ranges from a calibrator over histograms of |x|, no training."""

    calibrator: Calibrator = Field(
        "percentile", description="minmax: abs-max over all images; percentile: that percentile of |x|; mse: the clip "
                                  "minimising the quantization MSE; entropy: TensorRT's KL-divergence calibration"
    )
    percentile: float = Field(99.99, gt=0, le=100, description="for calibrator=percentile")
    num_images: int = Field(256, ge=1, description="calibration images, the first ones of the pool (no augmentation)")
    batch_size: Optional[int] = Field(None, ge=1, description="default: data.batch_size")
    bins: int = Field(2048, ge=256, le=65536, description="histogram bins over [0, abs-max] per activation")
    source: Optional[str] = Field(None, description="unlabeled images to calibrate on; default: data.train")


class FidelityConfig(_Section):
    """Label-free fidelity: the student scored against the teacher's own predictions (and per-node output SNR) on a
    held-out slice of unlabeled images (the last `images` of the pool, which training then leaves out)."""

    enabled: bool = True
    images: int = Field(64, ge=1)
    source: Optional[str] = Field(None, description="images to use instead of the held-out slice of data.train")
    teacher_conf: float = Field(0.25, gt=0, lt=1, description="confidence above which teacher detections are GT")
    batch_size: Optional[int] = Field(None, ge=1, description="default: eval.batch_size")


class EvalConfig(_Section):
    data: Optional[str] = Field(None, description="labeled Ultralytics data yaml for the built-in COCO mAP")
    split: Literal["val", "test", "train"] = "val"
    callback: Optional[str] = Field(None, description="'package.module:function' returning a dict of floats")
    metric: Optional[str] = Field(None, description="key of the eval result that picks best.pt (higher is better)")
    every: int = Field(200, ge=1, description="evaluate every N iterations (and at the end)")
    before: bool = Field(True, description="evaluate the teacher and the untrained student first")
    imgsz: Optional[int] = None
    batch_size: int = Field(16, ge=1)
    max_images: Optional[int] = Field(None, ge=1)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)

    @field_validator("callback")
    @classmethod
    def _callback_form(cls, v):
        if v is not None and (":" not in v or not all(v.split(":", 1))):
            raise ValueError("expected 'package.module:function'")
        return v
