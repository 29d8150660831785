"""What act knows per model family: where teachers come from, how to load them, their head branches, the layers that
stay in float, and the metadata their exports carry.

`resolve_teacher(name)` turns a config's `model.teacher` into a local file; `family_for(model)` returns the family
object that answers everything else.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import yaml

from act.errors import ModelError

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")


@dataclass(frozen=True)
class TeacherSource:
    name: str
    path: Path
    kind: str  # "pt" (trained checkpoint) or "yaml" (architecture, random weights)
    family: str = "ultralytics-yolo"


def registry() -> Dict[str, dict]:
    return yaml.safe_load(REGISTRY_FILE.read_text()) or {}


def _weights_dirs():
    dirs = []
    if os.environ.get("ACT_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["ACT_WEIGHTS_DIR"]))
    dirs += [Path("weights"), Path(".")]
    return dirs


def _is_ultralytics_model_yaml(name: str) -> bool:
    """Ultralytics' own architecture yamls (e.g. yolov8n-pose.yaml: scale 'n' of yolov8-pose.yaml), offline."""
    from ultralytics.nn.tasks import yaml_model_load

    try:
        return bool(yaml_model_load(name))
    except Exception:
        return False


def resolve_teacher(name: str) -> TeacherSource:
    """Resolve a teacher name or path to a local file, never downloading. Raises ModelError saying where to put it."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return TeacherSource(name, p, "yaml")
        if _is_ultralytics_model_yaml(p.name):
            return TeacherSource(name, Path(p.name), "yaml")
        raise ModelError(f"model yaml not found: {name}")
    if p.suffix and p.is_file():
        return TeacherSource(name, p, "pt")
    reg = registry()
    key = p.stem if p.suffix == ".pt" else name
    entry = reg.get(key)
    if entry is None:
        if p.suffix:
            raise ModelError(f"teacher checkpoint not found: {name}")
        known = ", ".join(sorted(reg))
        raise ModelError(f"unknown teacher {name!r}: give a path to an Ultralytics .pt, or one of: {known}")
    if entry.get("package"):
        if importlib.util.find_spec(entry["package"]) is not None:
            f = importlib.resources.files(entry["package"]) / entry["file"]
            if f.is_file():
                return TeacherSource(key, Path(str(f)), "pt", entry.get("family", "ultralytics-yolo"))
    for d in _weights_dirs():
        f = d / entry["file"]
        if f.is_file():
            return TeacherSource(key, f, "pt", entry.get("family", "ultralytics-yolo"))
    where = ", ".join(str(d / entry["file"]) for d in _weights_dirs())
    how = []
    if entry.get("install"):
        how.append(f"`{entry['install']}`")
    if entry.get("url"):
        how.append(f"download {entry['url']}")
    raise ModelError(
        f"teacher {key!r} is not on this machine (act never downloads). Put {entry['file']} at one of: {where}"
        + (f" ({' or '.join(how)})" if how else "")
        + ", or set model.teacher to its path."
    )


def family_for(model):
    """The family object for a loaded model (only Ultralytics YOLO so far)."""
    from teachers.ultralytics_yolo import UltralyticsYOLO

    return UltralyticsYOLO()
