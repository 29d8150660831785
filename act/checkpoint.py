"""Checkpoints that Ultralytics `YOLO()` loads and that act resumes from, written atomically.

Layout: Ultralytics' own keys (`model` holds the student module, `train_args`, `date`, `version`) plus `act`, with
the training state (iteration, optimizer, scheduler, RNG, best metric, config as run).
"""

from __future__ import annotations

import copy
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from act.errors import ActError


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
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ActError(f"could not write checkpoint {path}: {e.strerror or e} (the previous file is intact)") from e
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def make_checkpoint(student: nn.Module, state: Dict[str, Any], train_args: Optional[Dict] = None) -> Dict[str, Any]:
    from ultralytics import __version__

    return {
        "date": datetime.now().isoformat(),
        "version": __version__,
        "model": _clean_copy(student),
        "train_args": train_args or {},
        "act": state,
    }


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
