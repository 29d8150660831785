"""The distillation section: which nodes, which loss per branch (a loss of act.core.registry.LOSSES; losses with
parameters of their own declare them in a LossSpec subclass there), features, pseudo-labels."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Union

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from act.core.config.registered import validate_entry
from act.core.config.sections import _Section
from act.core.registry import LOSSES


BranchType = Literal["box", "cls", "kpt", "other", "feature"]


class LossSpec(_Section):
    """One distillation loss, by the name it is registered under (act.core.registry.LOSSES; act's own:
    act.blocks.losses). `soft_label`: softmax with temperature over `axis`, cross-entropy (KL) to the teacher.
    `l2`: mean squared error. `bce`: sigmoid cross-entropy with the teacher's sigmoid as soft target. `oks` (keypoint
    branch): 1 - OKS of the student's keypoints against the teacher's, sized by the teacher's box and weighted by its
    keypoint visibility, plus a visibility soft-label term (its own key: `visibility_weight`, act.blocks.losses).
    `weighting`: `uniform` averages over every anchor position; `teacher_score` weights each position by the teacher's
    class score there (its highest sigmoid class probability at the same pyramid level), so the box / keypoint loss
    is spent where the model's outputs are used, not on background anchors whose boxes and keypoints are discarded."""

    type: str
    temperature: float = Field(1.0, gt=0)
    axis: Literal["channel", "spatial", "dfl"] = "channel"
    weight: float = Field(1.0, ge=0)
    weighting: Literal["uniform", "teacher_score"] = "uniform"

    @field_validator("type")
    @classmethod
    def _registered(cls, v):
        return LOSSES.check(v)

    @model_validator(mode="after")
    def _weighting_per_position(self):
        if self.weighting == "teacher_score" and self.type == "soft_label" and self.axis == "spatial":
            raise ValueError("weighting teacher_score needs a loss per anchor position (axis channel or dfl)")
        return self


def _default_losses() -> Dict[str, LossSpec]:
    return {
        "box": LossSpec(type="soft_label", axis="dfl", temperature=1.0),
        "cls": LossSpec(type="bce"),
        "kpt": LossSpec(type="l2"),
        "other": LossSpec(type="l2"),
        "feature": LossSpec(type="l2"),
    }


class PseudoLabelConfig(_Section):
    """Teacher pseudo-labels through the family's own training loss (Ultralytics: v8PoseLoss / v8DetectionLoss on the
    teacher's NMS'd detections of each batch), added to the distillation loss. No human labels."""

    enabled: bool = False
    weight: float = Field(0.25, gt=0, description="weight of the pseudo-label loss (per image, with the family's "
                                                   "own gains) in the total")
    conf: float = Field(0.25, gt=0, lt=1, description="teacher detections kept: class score above this (after NMS)")
    iou: float = Field(0.7, gt=0, le=1, description="NMS IoU of the teacher's detections")
    kpt_conf: float = Field(0.5, gt=0, lt=1, description="a keypoint counts as labelled where the teacher's keypoint "
                                                         "confidence is above this")


class DistillConfig(_Section):
    nodes: Union[Literal["auto"], List[str]] = Field(
        "auto", description="'auto': the last conv of each head branch; or explicit module names"
    )
    losses: Dict[BranchType, SerializeAsAny[LossSpec]] = Field(default_factory=_default_losses,
                                                               description="loss per branch type")
    node_weights: Dict[str, float] = Field(default_factory=dict, description="module name -> extra weight")
    features: Union[Literal["auto"], List[str]] = Field(
        default_factory=list,
        description="feature maps distilled too (loss: losses.feature, L2 relative to the teacher's mean square): "
                    "'auto': the neck outputs the head reads, one per pyramid level; or module names; [] none. A "
                    "pruned student's channels are matched to the teacher channels they were kept from")
    pseudo_labels: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)

    @field_validator("losses", mode="before")
    @classmethod
    def _start_from_defaults(cls, v):
        """Every branch starts from its default loss; keys given override it (`losses: {kpt: {weight: 2}}` keeps
        type l2), branches not given keep theirs."""
        if not isinstance(v, dict):
            return v
        merged: Dict[str, Any] = _default_losses()
        for k, spec in v.items():
            if isinstance(spec, dict) and spec.get("type") != "oks" and spec.get("visibility_weight") == 1.0:
                # config.yaml written before losses declared their own keys (2026-12-07) carries oks's
                # visibility_weight, at its default, on every branch, where it did nothing
                spec = {key: val for key, val in spec.items() if key != "visibility_weight"}
            merged[k] = {**merged[k].model_dump(), **spec} if isinstance(spec, dict) and k in merged else spec
        # each entry as the config model its loss registered (e.g. oks: visibility_weight)
        return {k: validate_entry(LOSSES, spec, LossSpec, (k,)) for k, spec in merged.items()}

    @field_validator("losses")
    @classmethod
    def _branch_rules(cls, v):
        if v["cls"].weighting != "uniform":
            raise ValueError("cls.weighting: expected 'uniform' (the class branch must learn the background too)")
        if v["feature"].type != "l2":
            raise ValueError("feature.type: expected 'l2' (feature maps are compared channel for channel)")
        return v
