"""What every stage of a staged run (`stages:`) has: a name, its train overrides, its type. Each stage type declares
its own config model (a StageConfig subclass) where its kind is defined and registers both in
act.core.registry.STAGE_KINDS (act's own: act.orchestrate.stage_kinds); `RunConfig.stages` validates each entry as
the model its type registered."""

from __future__ import annotations

from typing import Optional

from typing_extensions import Annotated

from pydantic import Field, model_validator

from act.core.config.sections import TrainConfig, _Section


def _train_overrides_model():
    """TrainConfig with every field optional and no default: a stage's `train:` overrides of the top-level section."""
    from pydantic import create_model

    fields = {}
    for name, f in TrainConfig.model_fields.items():
        ann = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = (Optional[ann], Field(None, description=f.description))
    return create_model("StageTrainConfig", __base__=_Section, **fields)


StageTrainConfig = _train_overrides_model()


class StageConfig(_Section):
    type: str = Field(description="the stage type (a name registered in act.core.registry.STAGE_KINDS)")
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
