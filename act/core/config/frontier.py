"""`frontier:` (act frontier, and `strategy: auto` with a latency or MACs budget): which points of the
accuracy-latency frontier to make and measure. A point is one way to make the model cheaper, or several at once: the
input size it runs at, the share of the teacher's MACs channel pruning keeps, and its precision (FP32, or INT8 by
distillation QAT or by PTQ)."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from act.core.config.sections import _Section

Precision = Literal["fp32", "int8"]
Int8Method = Literal["qat", "ptq"]
Skip = Optional[Union[Literal["auto"], List[str]]]


def _imgsz_ok(v: int) -> int:
    if v < 32 or v % 32:
        raise ValueError(f"expected a multiple of 32 (the network's stride), at least 32; got {v}")
    return v


class FrontierPoint(_Section):
    """One point: the teacher run at `imgsz`, pruned to `prune` x its MACs at that size (1.0: not pruned), in
    `precision` (int8 made by `int8`: qat = the config's distillation QAT, ptq = `act ptq`)."""

    imgsz: int
    prune: float = Field(1.0, gt=0, le=1, description="MACs kept by channel pruning, of the teacher's at this imgsz")
    precision: Precision = "int8"
    int8: Int8Method = Field("qat", description="how an int8 point is made (ignored for fp32)")
    skip: Skip = Field(None, description="quant.skip of this point (partial quantization); null: the config's")

    @field_validator("imgsz")
    @classmethod
    def _size(cls, v):
        return _imgsz_ok(v)

    def macs_ratio(self, base_imgsz: int) -> float:
        """The MACs this point aims at, as a share of the teacher's at base_imgsz (pruning's ratio x the size's)."""
        return self.prune * (self.imgsz / base_imgsz) ** 2

    @model_validator(mode="after")
    def _pruned_by_qat(self):
        if self.prune < 1 and self.precision == "int8" and self.int8 == "ptq":
            raise ValueError("a pruned int8 point is made by distillation QAT (its quant stage): int8: qat")
        return self

    @property
    def name(self) -> str:
        parts = [f"{self.imgsz}px"]
        if self.prune < 1:
            parts.append(f"prune{self.prune:g}")
        parts.append(self.precision if self.precision == "fp32" else f"int8-{self.int8}")
        if self.precision == "int8" and self.skip is not None:
            parts.append("skip-auto" if self.skip == "auto" else f"skip{len(self.skip)}")
        return "_".join(parts)


class FrontierConfig(_Section):
    """The points: every combination of `imgsz` x `prune` x `precision` (x `int8` x `skip` for int8 points), or the
    explicit `points` list. The teacher at data.imgsz in FP32 is always measured: it is the reference."""

    imgsz: List[int] = Field(default_factory=list, description="input sizes; default: [data.imgsz]")
    prune: List[float] = Field(default_factory=lambda: [1.0],
                               description="MACs ratios kept by channel pruning (1.0: no pruning)")
    precision: List[Precision] = Field(default_factory=lambda: ["fp32", "int8"])
    int8: List[Int8Method] = Field(default_factory=lambda: ["qat"], description="how int8 points are made")
    skip: List[Skip] = Field(default_factory=lambda: [None],
                             description="quant.skip values of int8 points (partial quantization; null: the config's)")
    points: Optional[List[FrontierPoint]] = Field(None, description="these points instead of the combinations")
    min_macs_ratio: float = Field(0.0, ge=0, le=1, description="leave out combinations below this share of the "
                                                               "teacher's MACs at data.imgsz")
    prune_stages: Optional[List[Dict[str, Any]]] = Field(
        None, description="the stages a pruned point runs; its prune stage's target becomes the point's prune ratio, "
                          "a quant stage is dropped for an fp32 point. Default: the config's own stages when they "
                          "have a prune stage, else [{type: prune}, {type: quant}]")
    prune_recipe: Optional[str] = Field(
        None, description="a run config whose settings (data, distill, train, stages) pruned points use, with this "
                          "config's teacher, data.imgsz set to the point's and its prune stage's target to the "
                          "point's ratio (e.g. configs/yolo11n_pose_prune_qat.yaml); default: this config with "
                          "prune_stages")
    metric: Optional[str] = Field(
        None, description="the accuracy that ranks the points (higher is better), any key a point's measurement has; "
                          "default: the labeled mAP50-95 with eval.data, else label-free fidelity mAP50-95")
    runtime: Literal["auto", "openvino", "onnxruntime", "tensorrt"] = Field(
        "auto", description="the runtime whose latency ranks the points: auto = openvino where installed, else "
                            "onnxruntime. Latency is measured in every installed runtime")
    latency_runs: int = Field(30, ge=1, description="timed runs per round, point and runtime (batch 1, median)")
    latency_rounds: int = Field(3, ge=1, description="timing rounds; the round with the lowest median counts (a "
                                                     "shared machine's medians swing between rounds)")
    output_dir: Optional[str] = Field(None, description="default: <output_dir>/frontier")

    @field_validator("imgsz")
    @classmethod
    def _sizes(cls, v):
        return [_imgsz_ok(s) for s in v]

    @field_validator("prune")
    @classmethod
    def _ratios(cls, v):
        for r in v:
            if not 0 < r <= 1:
                raise ValueError(f"expected MACs ratios in (0, 1]; got {r}")
        return v

    @model_validator(mode="after")
    def _not_empty(self):
        for key in ("prune", "precision", "int8", "skip"):
            if not getattr(self, key):
                raise ValueError(f"{key}: expected at least one value")
        return self

    def expand(self, base_imgsz: int) -> List[FrontierPoint]:
        """The points to make, without duplicates, in the order given (combinations below min_macs_ratio left
        out)."""
        if self.points is not None:
            pts = list(self.points)
        else:
            pts = []
            for s in self.imgsz or [base_imgsz]:
                for r in self.prune:
                    for p in self.precision:
                        if p == "fp32":
                            pts.append(FrontierPoint(imgsz=s, prune=r, precision="fp32"))
                            continue
                        for m in (self.int8 if r == 1 else ["qat"]):  # a pruned student is trained anyway
                            for k in self.skip:
                                pts.append(FrontierPoint(imgsz=s, prune=r, precision="int8", int8=m, skip=k))
        seen, out = set(), []
        for p in pts:
            if self.points is None and p.macs_ratio(base_imgsz) < self.min_macs_ratio:
                continue
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
        return out
