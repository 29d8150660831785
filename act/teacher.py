"""The frozen teacher: resolve a teacher name (teachers.resolve_teacher), load it with its model family
(act.family), fold its BatchNorm layers and freeze it."""

from __future__ import annotations

from typing import Tuple

from torch import nn

from act.family import family_named


def load_frozen(name: str, family: str = "auto") -> Tuple[nn.Module, object, object]:
    """(model BN-folded / frozen / eval, family, source) for a teacher name, a checkpoint path or a model yaml.
    family: `model.family` (see teachers.resolve_teacher)."""
    from teachers import resolve_teacher

    src = resolve_teacher(name, family)
    fam = family_named(src.family)
    model = fam.load(src.path, src.kind)
    fam.fold_batchnorm(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, fam, src
