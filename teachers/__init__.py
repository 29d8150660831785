"""Where teachers come from: the registry of teacher names (registry.yaml) and `resolve_teacher(name, family)`, which
turns a config's `model.teacher` (and `model.family`) into a local file and the name of the model family that loads
it. Everything about the model itself is the family's (act/core/family.py; the built-in ones in families/).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import yaml

from act.core.errors import ModelError
from act.core.family import DEFAULT, families, family_named

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")


@dataclass(frozen=True)
class TeacherSource:
    name: str
    path: Path
    kind: str  # "pt" (trained checkpoint) or "yaml" (architecture, random weights)
    family: str = DEFAULT  # the act.core.family registry name of the family that loads it


def registry() -> Dict[str, dict]:
    return yaml.safe_load(REGISTRY_FILE.read_text()) or {}


def _weights_dirs():
    dirs = []
    if os.environ.get("ACT_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["ACT_WEIGHTS_DIR"]))
    dirs += [Path("weights"), Path(".")]
    return dirs


def _architecture_family(name: str, family: str) -> Optional[str]:
    """The family that builds the architecture yaml `name` without a file (the named one, or the first that can)."""
    candidates = families() if family == "auto" else [family_named(family)]
    return next((f.name for f in candidates if f.resolves_architecture(name)), None)


def resolve_teacher(name: str, family: str = "auto") -> TeacherSource:
    """Resolve a teacher name or path to a local file. A registered name not on disk is downloaded by its family
    (unless the user set YOLO_OFFLINE); else ModelError says where to put it.

    family: `model.family`; 'auto' takes the registry entry's family (a file: the default family), else the family
    named (which must be registered: act.core.family.register_family)."""
    if family != "auto":
        family_named(family)  # raises ModelError naming the registered families
    fixed = None if family == "auto" else family
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return TeacherSource(name, p, "yaml", fixed or DEFAULT)
        builder = _architecture_family(p.name, family)
        if builder:
            return TeacherSource(name, Path(p.name), "yaml", builder)
        raise ModelError(f"model yaml not found: {name}")
    if p.suffix and p.is_file():
        return TeacherSource(name, p, "pt", fixed or DEFAULT)
    reg = registry()
    key = p.stem if p.suffix == ".pt" else name
    entry = reg.get(key)
    if entry is None:
        if p.suffix:
            raise ModelError(f"teacher checkpoint not found: {name}")
        known = ", ".join(sorted(reg))
        raise ModelError(f"unknown teacher {name!r}: give a path to an Ultralytics .pt, or one of: {known}")
    fam = fixed or entry.get("family", DEFAULT)
    if entry.get("package"):
        if importlib.util.find_spec(entry["package"]) is not None:
            f = importlib.resources.files(entry["package"]) / entry["file"]
            if f.is_file():
                return TeacherSource(key, Path(str(f)), "pt", fam)
    for d in _weights_dirs():
        f = d / entry["file"]
        if f.is_file():
            return TeacherSource(key, f, "pt", fam)
    fetched = _fetch(entry, fam)
    if fetched is not None:
        return TeacherSource(key, fetched, "pt", fam)
    where = ", ".join(str(d / entry["file"]) for d in _weights_dirs())
    how = []
    if entry.get("install"):
        how.append(f"`{entry['install']}`")
    if entry.get("url"):
        how.append(f"download {entry['url']}")
    why = ("offline: YOLO_OFFLINE is set, so act did not download it" if _user_offline() else
           "act could not download it (no network?)" if entry.get("url") else "it is not downloadable")
    raise ModelError(
        f"teacher {key!r} is not on this machine ({why}). Put {entry['file']} at one of: {where}"
        + (f" ({' or '.join(how)})" if how else "")
        + ", or set model.teacher to its path."
    )


def _user_offline() -> bool:
    import act

    return act.USER_OFFLINE


def _fetch(entry: dict, family: str) -> Optional[Path]:
    """A registered teacher with a published checkpoint (`url` in the registry), fetched by its family's own
    download into $ACT_WEIGHTS_DIR (default ./weights), as Ultralytics users expect from `YOLO('yolov8s-pose.pt')`;
    never when the user set YOLO_OFFLINE, and None without network."""
    if not entry.get("url") or _user_offline():
        return None
    folder = Path(os.environ.get("ACT_WEIGHTS_DIR") or "weights")
    print(f"act: {entry['file']} is not on this machine; downloading it into {folder}/ (YOLO_OFFLINE=1 prevents this)")
    return family_named(family).fetch_weights(entry["file"], folder)
