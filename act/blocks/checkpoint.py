"""Checkpoints that the model family loads (Ultralytics: `YOLO()`) and that act resumes from, written atomically.

Layout: the family's (`act.core.family.ModelFamily.checkpoint`; Ultralytics: its own keys, `model` holding the student
module, `train_args`, `date`, `version`), always with `model` and `act`, the training state (iteration, optimizer,
scheduler, RNG, best metric, config as run).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from act.core.errors import ActError
from act.core.fileio import atomic_torch_save


def _clean_copy(model: nn.Module) -> nn.Module:
    """A CPU copy without forward hooks (hooks hold closures that must not be pickled)."""
    m = copy.deepcopy(model).cpu()
    for sub in m.modules():
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
        sub._backward_hooks.clear()
        if getattr(sub, "reduce_fn", None) is not None:
            sub.reduce_fn = None  # the DDP all-reduce belongs to the run, not the saved model
    return m


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`: a crash at any moment leaves
    either the old file or the new one, never half of one (act.core.fileio). A failed write raises ResourceError naming
    the path; the previous checkpoint is intact."""
    atomic_torch_save(obj, path, what="checkpoint")


def make_checkpoint(student: nn.Module, state: Dict[str, Any], train_args: Optional[Dict] = None,
                    family=None) -> Dict[str, Any]:
    """The family's checkpoint dict of a clean CPU copy of `student` (family: default act.core.family.family_for)."""
    if family is None:
        from act.core.family import family_for

        family = family_for(student)
    return family.checkpoint(_clean_copy(student), state, train_args)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ActError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ActError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "act" not in ckpt or "model" not in ckpt:
        raise ActError(f"{path} is not an act checkpoint (no 'act' training state)")
    return ckpt
