"""The stages of a staged run (`stages:`): one config model per stage kind (act.stage_kinds)."""

from __future__ import annotations

from typing import List, Literal, Optional, Union

from typing_extensions import Annotated

from pydantic import Field, model_validator

from act.config.sections import TrainConfig, _Section


def _train_overrides_model():
    """TrainConfig with every field optional and no default: a stage's `train:` overrides of the top-level section."""
    from pydantic import create_model

    fields = {}
    for name, f in TrainConfig.model_fields.items():
        ann = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = (Optional[ann], Field(None, description=f.description))
    return create_model("StageTrainConfig", __base__=_Section, **fields)


StageTrainConfig = _train_overrides_model()


class _Stage(_Section):
    name: Optional[str] = Field(None, description="label of the stage (its folder, TensorBoard run); default: type")
    train: StageTrainConfig = Field(default_factory=StageTrainConfig,
                                    description="overrides of the top-level train section for this stage")

    @property
    def label(self) -> str:
        return self.name or self.type

    @model_validator(mode="after")
    def _one_length(self):
        if self.train.iterations is not None and self.train.epochs is not None:
            raise ValueError("train: set either iterations or epochs, not both")
        return self


class PruneStage(_Stage):
    """Structured channel pruning (torch-pruning DepGraph) in `steps` steps with distillation between them."""

    type: Literal["prune"]
    target: float = Field(0.6, gt=0, lt=1, description="keep this share of the teacher's MACs (or params)")
    metric: Literal["macs", "params"] = "macs"
    scope: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: every layer loses the same share of channels; global: one ranking over all")
    importance: Literal["l1", "l2", "group_norm", "lamp", "taylor"] = Field(
        "l2", description="channel-group importance: magnitude (l1 / l2 = group_norm), LAMP, or first-order Taylor "
                          "on the distillation loss")
    steps: int = Field(4, ge=1, description="pruning steps, each to a linearly smaller share of the MACs")
    step_iterations: Optional[int] = Field(
        None, ge=1, description="distillation iterations between pruning steps; default: half the stage's "
                                "iterations / steps (the rest, after the last step, fine-tunes)")
    taylor_batches: int = Field(4, ge=1, description="distillation batches whose gradients feed Taylor importance")
    decay_iterations: int = Field(
        0, ge=0, description="gradual removal: each pruning step decides its channels at its iteration, shrinks them "
                             "linearly to zero over this many distillation iterations while the rest of the network "
                             "learns to do without them, then removes them (which then changes nothing). 0: removed "
                             "at once. Must be shorter than step_iterations")
    max_layer_ratio: float = Field(0.8, gt=0, lt=1, description="no layer loses more than this share of channels")
    close_gap: bool = Field(
        False, description="scope uniform: where round_to's staircase leaves the MACs (params) more than 2% off a "
                           "step's goal, stop on the stair above and remove the rest with one global ranking over the "
                           "layers outside the head (at most a quarter of any layer). false: the nearest stair. It "
                           "lands on the target but cost accuracy where measured (GPU: 0.64x -> 0.60x took pose mAP "
                           "0.198 -> 0.137, taking the MACs from deep layers); a smaller round_to reaches the target "
                           "more cheaply (round_to 4: 0.61x, 0.193)")
    round_to: Optional[int] = Field(
        8, ge=2, description="keep channel counts multiples of this (odd widths run slower than the unpruned model in "
                             "onnxruntime / TensorRT kernels); null: any width")
    ignore: List[str] = Field(default_factory=list,
                              description="module-name globs (or 're:' regexes) whose output channels stay")
    keep_branches: List[Literal["box", "cls", "kpt"]] = Field(
        default_factory=list, description="head branches whose convs all keep their width (the model family knows "
                                          "which modules they are), e.g. [kpt]: the keypoint branch's hidden convs "
                                          "are no wider than its 51 outputs (docs/pruning.md); the other layers then "
                                          "lose more to meet the target")
    bias_compensation: bool = Field(
        True, description="fold the mean of each removed input channel (over a batch) into the next conv's bias "
                          "(BN-folded students only: a BatchNorm in train mode re-centres by itself)")
    keep_batchnorm: bool = Field(
        True, description="the first stage's student trains with the model's BatchNorm layers (loaded un-folded; "
                          "normalization makes the pruned network far easier to retrain) and they are folded into "
                          "the convs when the stage ends (best.pt, ONNX). false: the BN-folded student of QAT. "
                          "Under DDP the student is always BN-folded")


class SparsityStage(_Stage):
    """Fine-grained sparsity kept by masks through this and every later stage; weights stay dense with zeros."""

    type: Literal["sparsity"]
    pattern: Literal["2:4", "unstructured"] = Field(
        "2:4", description="2:4: two of every four weights along the input channels are zero (TensorRT sparse tensor "
                           "cores); unstructured: the smallest weights by magnitude")
    ratio: float = Field(0.5, gt=0, lt=1, description="unstructured: share of weights set to zero")
    scope: Literal["layer", "global"] = Field("layer", description="unstructured: threshold per layer or global")
    ignore: List[str] = Field(default_factory=list, description="module-name globs (or 're:' regexes) kept dense")


class QuantStage(_Stage):
    """Fake-quantization (the top-level quant section) + distillation."""

    type: Literal["quant"]


class DistillStage(_Stage):
    """Plain distillation, no structural change (e.g. a longer recovery after pruning)."""

    type: Literal["distill"]


Stage = Annotated[Union[PruneStage, SparsityStage, QuantStage, DistillStage], Field(discriminator="type")]
