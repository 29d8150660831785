"""Metrics: the built-in COCO mAP (the model family's labeled evaluation: for Ultralytics its validators, the same
code as `yolo val`) and user callbacks.

A callback is `package.module:function`, called as `fn(model, context)` with the student in eval mode and an
`EvalContext`; it returns a dict of floats.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import yaml

from act.core.errors import ConfigError


@dataclass
class EvalContext:
    device: torch.device
    imgsz: int
    iteration: int
    output_dir: Optional[Path] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def load_callback(spec: str) -> Callable:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise ConfigError(f"invalid config:\n  eval.callback: cannot import {mod_name!r} ({type(e).__name__}: {e})")
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"invalid config:\n  eval.callback: {mod_name!r} has no function {fn_name!r}")
    return fn


def subset_data_yaml(data_yaml: str, split: str, max_images: Optional[int], workdir: Path) -> str:
    """A copy of an Ultralytics data yaml with an absolute `path` (Ultralytics would resolve a relative one against
    the working folder or its datasets folder, not the yaml's), whose `split` lists only the first `max_images`
    images if given."""
    from act.blocks.data import resolve_source, yaml_root

    src = Path(data_yaml)
    data = yaml.safe_load(src.read_text())
    root = yaml_root(src, data)
    if not max_images and Path(data.get("path") or "/").is_absolute():
        return data_yaml
    data["path"] = str(root)
    workdir.mkdir(parents=True, exist_ok=True)
    if max_images:
        entry = data[split]
        images = resolve_source(str(entry if Path(entry).is_absolute() else root / entry))[:max_images]
        lst = workdir / f"{split}_subset.txt"
        lst.write_text("\n".join(str(p.resolve()) for p in images) + "\n")
        data[split] = str(lst.resolve())
    out = workdir / "data_subset.yaml"
    out.write_text(yaml.safe_dump(data))
    return str(out)


class CocoEvaluator:
    """COCO-style mAP50-95 / mAP50 of boxes (and keypoints for pose) on a labeled Ultralytics data yaml."""

    def __init__(self, data: str, task: str, imgsz: int, batch_size: int = 16, max_images: Optional[int] = None,
                 split: str = "val", workdir: Optional[Path] = None, rect: bool = True, family=None):
        """rect: batch images of similar aspect into rectangular inputs (Ultralytics' val default, torch models only);
        False letterboxes every image to the square imgsz, as a fixed-shape export always sees it. family: the model
        family whose labeled evaluation runs (act.core.family; default: the default family)."""
        if not Path(data).is_file():
            raise ConfigError(f"invalid config:\n  eval.data: file not found (got {data!r})")
        self.task = task
        self.imgsz = imgsz
        self.batch_size = batch_size
        self.split = split
        self.rect = rect
        self._family = family
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="act_eval_")
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.data = subset_data_yaml(data, split, max_images, self.workdir)

    @property
    def family(self):
        if self._family is None:
            from act.core.family import default_family

            self._family = default_family()
        return self._family

    def __call__(self, model, context: Optional[EvalContext] = None) -> Dict[str, float]:
        """model: a torch module (evaluated on a copy), or a path to any artifact the family runs (Ultralytics: .pt,
        .onnx, .engine)."""
        device = context.device if context else torch.device("cpu")
        return self.family.labeled_metrics(model, self.data, self.task, self.imgsz, self.batch_size, self.split,
                                           device, self.workdir, self.rect)


def default_metric(task: str, family=None) -> str:
    """The labeled metric that ranks students (the family's; default family: pose_map50_95 / box_map50_95)."""
    if family is None:
        from act.core.family import default_family

        family = default_family()
    return family.default_metric(task)
