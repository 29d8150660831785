"""What a run is built from: the device, the seed, the frozen teacher and the fake-quantized student.

    teacher, family, source = load_teacher(cfg)
    student = build_student(teacher, cfg, family)          # a deep copy, quantized and placed for TensorRT

Every kind of run (QAT trainer, PTQ, a stage of a staged run, analyze, eval) builds its models here, so there is one
way to load a teacher and one way to make a student.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from act.blocks import quant as Q
from act.core.config import RunConfig
from act.core.errors import ConfigError, ModelError
from act.core.family import family_named
from teachers import resolve_teacher


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid config:\n  train.device: CUDA is not available on this machine (got {spec!r})")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_frozen(name: str, family: str = "auto"):
    """(model with BatchNorm folded, frozen, in eval mode; its family; its source) for a teacher name, a checkpoint
    path or a model yaml. family: `model.family` (see teachers.resolve_teacher)."""
    src = resolve_teacher(name, family)
    family = family_named(src.family)
    model = family.load(src.path, src.kind)
    family.fold_batchnorm(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, family, src


def load_teacher(cfg: RunConfig):
    """(teacher module fused/frozen/eval, family, source), checked against `model.task`."""
    model, family, src = load_frozen(cfg.model.teacher, cfg.model.family)
    task = family.task(model)
    if cfg.model.task != "auto" and cfg.model.task != task:
        raise ConfigError(f"invalid config:\n  model.task: {cfg.model.task!r}, but {src.path} is a {task} model")
    return model, family, src


def build_student(teacher: nn.Module, cfg: RunConfig, family, base: Optional[nn.Module] = None) -> nn.Module:
    """The student before training: `base` (default: a deep copy of the BN-folded teacher) made trainable and, when
    quant.enabled, fake-quantized with the family's Q/DQ placement. The placement is checked against a float copy of
    `base` (a pruned student computes what it computed in float). Not calibrated yet."""
    student = copy.deepcopy(teacher) if base is None else base
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.quant.enabled:
        from act.blocks.quant.placement import apply_placement

        reference = teacher if base is None else copy.deepcopy(student).eval()
        Q.quantize(student, cfg.quant, skip=family.float_patterns)
        student.act_placement = apply_placement(student, cfg.quant, family, reference=reference)
    return student


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any work when a file the config names is missing (names resolved elsewhere are checked there)."""
    from act.blocks.data import resolve_source_exists
    from teachers import resolve_teacher

    try:
        resolve_teacher(cfg.model.teacher, cfg.model.family)  # raises ModelError(exit 2) with where to put it
    except ModelError as e:
        raise ModelError(f"invalid config:\n  model.teacher: {e}") from None
    problem = resolve_source_exists(cfg.data.train)
    if problem:
        raise ConfigError(f"invalid config:\n  data.train: {problem}")
    if cfg.eval.data and not Path(cfg.eval.data).is_file():
        raise ConfigError(f"invalid config:\n  eval.data: file not found (got {cfg.eval.data!r})")
    if cfg.quant.init_from and not Path(cfg.quant.init_from).is_file():
        raise ConfigError(f"invalid config:\n  quant.init_from: file not found (got {cfg.quant.init_from!r})")
    for key, src in (("ptq.source", cfg.ptq.source), ("eval.fidelity.source", cfg.eval.fidelity.source)):
        problem = src and resolve_source_exists(src)
        if problem:
            raise ConfigError(f"invalid config:\n  {key}: {problem}")
