"""Typed, validated run configuration.

A config is YAML; every section is a pydantic model that forbids unknown keys. `load_config` applies `key=value`
overrides, validates, and raises `ConfigError` naming the key path and what was expected, before any work starts.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from act.core.errors import ConfigError
from act.core.config.distill import BranchType, DistillConfig, LossSpec, PseudoLabelConfig  # noqa: F401 (re-exported)
from act.core.config.export import (  # noqa: F401 (re-exported: the config models are importable from act.core.config)
    OUTPUT_BRANCHES, ExportConfig, OpenVINOConfig, ReportConfig, TensorRTConfig,
)
from act.core.config.frontier import FrontierConfig, FrontierPoint  # noqa: F401 (re-exported)
from act.core.config.registered import validate_entry
from act.core.config.sections import (  # noqa: F401 (re-exported: the config models are importable from act.core.config)
    ActivationQuantConfig, AnalyzeConfig, AugmentConfig, AutoConfig, AutoSkipConfig, Calibrator, DataConfig,
    EvalConfig, FidelityConfig, ModelConfig, NanPolicyConfig, PTQCandidate, PTQConfig, PlacementConfig, PruneTarget,
    QuantConfig, TargetConfig, TrainConfig, WeightQuantConfig, _Section, _default_search,
)
from act.core.config.stages import StageConfig, StageTrainConfig  # noqa: F401 (re-exported)
from act.core.registry import STAGE_KINDS


class RunConfig(_Section):
    """A whole `act compress` (or `act ptq`) run."""

    model: ModelConfig
    data: DataConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    ptq: PTQConfig = Field(default_factory=PTQConfig)
    strategy: Literal["auto", "ptq", "qat"] = Field(
        "auto", description="auto: PTQ probe, then QAT only if needed; ptq; qat: distillation QAT")
    auto: AutoConfig = Field(default_factory=AutoConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    frontier: FrontierConfig = Field(default_factory=FrontierConfig,
                                     description="act frontier / auto's budget: the points measured")
    output_dir: str = "runs/act/exp"
    stages: Optional[List[SerializeAsAny[StageConfig]]] = Field(
        None, description="run these stages in order (e.g. prune then quant), each from the previous stage's best "
                          "student; default: one stage, quant if quant.enabled else distill. Each entry's type is a "
                          "registered stage kind (act.core.registry.STAGE_KINDS) and takes that kind's keys")

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_models(cls, v):
        """Each entry as the config model its type registered (prune: target, steps, ...)."""
        if not isinstance(v, list):
            return v
        return [validate_entry(STAGE_KINDS, s, StageConfig, (i,)) for i, s in enumerate(v)]

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v):
        if v is not None:
            if not v:
                raise ValueError("expected at least one stage (or leave stages out)")
            labels = [s.label for s in v]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"stage names must differ (set name: on repeated types): {dup}")
            types = [s.type for s in v]
            if "quant" in types and types.index("quant") != len(types) - 1:
                raise ValueError("the quant stage must be the last stage (pruning and sparsity act on float weights)")
        return v

    @field_validator("frontier")
    @classmethod
    def _frontier_stages(cls, v):
        """frontier.prune_stages: each entry as its registered stage model (errors keep the key path)."""
        if v.prune_stages:
            for i, s in enumerate(v.prune_stages):
                validate_entry(STAGE_KINDS, s, StageConfig, ("prune_stages", i))
            if not any(s.get("type") == "prune" for s in v.prune_stages):
                raise ValueError("prune_stages: expected a stage of type prune")
        return v

    @field_validator("output_dir")
    @classmethod
    def _usable_dir(cls, v):
        if not v.strip() or "\x00" in v:
            raise ValueError("expected a folder path (not empty, no NUL characters)")
        return v

    @model_validator(mode="after")
    def _budget_needs_auto(self):
        if self.auto.budget and self.strategy != "auto":
            raise ValueError(f"auto.latency_ms / auto.macs_ratio are the budget of strategy: auto (got strategy: "
                             f"{self.strategy!r})")
        return self

    @model_validator(mode="after")
    def _weight_range_for_target(self):
        """quant.weight.range auto: what export.target needs (int7 for cpu, int8 for tensorrt), written into the run's
        config.yaml resolved."""
        if self.quant.weight.range == "auto":
            self.quant.weight.range = "int7" if self.export.target == "cpu" else "int8"
        return self

    def dump(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")


def _set_dotted(d: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts; a number indexes a list that is there (`stages.0.target`)."""
    keys = dotted.split(".")
    cur: Any = d
    for i, k in enumerate(keys):
        where = ".".join(keys[: i + 1])
        if isinstance(cur, list):
            if not k.isdigit() or int(k) >= len(cur):
                raise ConfigError(f"override {dotted!r}: {where}: expected an index below {len(cur)} "
                                  f"({'.'.join(keys[:i])} is a list of {len(cur)})")
            k = int(k)
        elif not isinstance(cur, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i])} is not a section")
        if i == len(keys) - 1:
            cur[k] = value
        elif isinstance(cur, dict) and cur.get(k) is None:
            cur[k] = {}
        cur = cur[k]


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """`key.sub=value` strings; values are parsed as YAML (so `3`, `true`, `[1, 2]` have their types)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.iterations=200)")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid config:\n  {key.strip()}: the override value {value!r} is not valid YAML "
                              f"({str(e).splitlines()[0]})") from None
        _set_dotted(out, key.strip(), parsed)
    return out


_UNION_TAG = re.compile(r"^(bool|int|float|str|bytes|none|(list|dict|tuple|set|literal|function-\w+|json-or-python|"
                        r"lax-or-strict|constrained-\w+|nullable)\[.*\]|function-\w+)$")


def _section_names() -> set:
    out, todo = set(), [_Section]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.add(sub.__name__)
            todo.append(sub)
    return out


def _key_path(loc) -> str:
    """The dotted key path of a pydantic error location, without the union member tags pydantic puts in it (e.g.
    data.augment.AugmentConfig.flip -> data.augment.flip)."""
    sections = _section_names()
    keep = [str(p) for i, p in enumerate(loc)
            if not (i > 0 and isinstance(p, str) and (_UNION_TAG.match(p) or p in sections))]
    return ".".join(keep) or "<root>"


def format_validation_error(err: ValidationError) -> str:
    merged: Dict[str, List[str]] = {}
    for e in err.errors():
        path = _key_path(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "missing required key"
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        item = f"{msg}{shown}"
        if item not in merged.setdefault(path, []):
            merged[path].append(item)
    lines = [f"  {path}: " + "; or ".join(items) for path, items in merged.items()]
    return "invalid config:\n" + "\n".join(lines)


def validate_config(raw: Dict[str, Any]) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    return raw if raw is not None else {}


def load_config(path: Union[str, Path, None] = None, overrides: Optional[List[str]] = None, raw=None) -> RunConfig:
    """Read, override and validate a run config; also checks that the optional packages it asks for are installed.
    (That the files it names exist is checked where a run starts: act.run.build.check_inputs.)"""
    raw = read_yaml(path) if raw is None else raw
    raw = apply_overrides(raw, overrides or [])
    cfg = validate_config(raw)
    check_optional_packages(cfg)
    return cfg


def check_optional_packages(cfg: RunConfig) -> None:
    """export.tensorrt.enabled / export.openvino.enabled without the package: exit 2 now, not after training."""
    if cfg.export.tensorrt.enabled:
        from act.core.optional_deps import import_tensorrt

        import_tensorrt()
    if cfg.export.openvino.enabled is True:
        from act.core.optional_deps import import_openvino

        import_openvino("export.openvino.enabled")
