"""`act eval`: evaluate any artifact with the same metric code as training, and print one table.

An artifact is a teacher name (teachers/registry.yaml), an Ultralytics .pt, an act checkpoint (best.pt, last.pt,
ptq.pt: its fake-quantized student runs in torch), or an exported file or folder (.onnx, .engine, an OpenVINO
`*_openvino_model/`, ...: the model family's `load_for_inference` runs it; Ultralytics' AutoBackend, onnxruntime for
ONNX, OpenVINO for IR folders). Metrics: CocoEvaluator (the
family's labeled evaluation: Ultralytics' validators) on a labeled data yaml, and, given a teacher, FidelityEvaluator
on unlabeled images (default: the held-out slice of the data yaml's train split, the same images `act compress`
holds out).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from act.core.errors import ConfigError, ModelError

TORCH_SUFFIXES = {".pt", ".pth"}


@dataclass
class Artifact:
    spec: str
    kind: str  # "teacher" (an Ultralytics model), "act" (an act checkpoint), or an export format ("onnx", ...)
    model: Union[nn.Module, str]
    task: str
    imgsz: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)


def load_artifact(spec: str, family: str = "auto") -> Artifact:
    """Resolve a model argument to something CocoEvaluator / FidelityEvaluator run. Raises ModelError (exit 2).
    family: the act.core.family name that loads teachers and runs exports ('auto': the teacher's registry entry / the
    default family; an act checkpoint's module is claimed by its family)."""
    from act.core.family import family_for
    from act.run.build import load_frozen

    p = Path(spec).expanduser()
    if p.is_dir() or (p.suffix and p.suffix not in TORCH_SUFFIXES and p.suffix not in (".yaml", ".yml")):
        if not p.exists():
            raise ModelError(f"model not found: {spec}")
        return _exported(spec, p, family)
    if p.suffix in TORCH_SUFFIXES and p.is_file():
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelError(f"{spec} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if isinstance(ckpt, dict) and "act" in ckpt and isinstance(ckpt.get("model"), nn.Module):
            model = ckpt["model"].float().eval()
            family = family_for(model)
            imgsz = (ckpt.get("train_args") or {}).get("imgsz")
            return Artifact(spec, "act", model, family.task(model), imgsz,
                            {"teacher": ckpt["act"].get("teacher"), "iteration": ckpt["act"].get("iteration")})
    elif p.suffix in TORCH_SUFFIXES:
        raise ModelError(f"model not found: {spec}")
    model, fam, src = load_frozen(spec, family)
    return Artifact(spec, "teacher", model, fam.task(model), None, {"path": str(src.path)})


def _exported(spec: str, path: Path, family: str = "auto") -> Artifact:
    from act.core.family import default_family, family_named

    fam = default_family() if family == "auto" else family_named(family)
    try:
        backend = fam.load_for_inference(path, torch.device("cpu"))
    except Exception as e:
        raise ModelError(f"{fam.name} could not load {spec}: {type(e).__name__}: {e}") from None
    task = getattr(backend, "task", None) or (getattr(backend, "metadata", None) or {}).get("task")
    if task not in ("pose", "detect"):
        raise ModelError(f"{spec}: task {task!r} from its metadata; act evaluates pose and detect models")
    imgsz = getattr(backend, "imgsz", None)
    imgsz = int(imgsz[0]) if isinstance(imgsz, (list, tuple)) else (int(imgsz) if imgsz else None)
    return Artifact(spec, getattr(backend, "format", path.suffix.lstrip(".")), str(path), task, imgsz,
                    {"batch": getattr(backend, "batch", None)})


def fidelity_paths(source: str, images: int):
    """The fidelity images of a source: for a pool (folder / data yaml), its held-out slice (last `images`)."""
    from act.blocks.data import resolve_source, split_holdout

    _, held, held_out = split_holdout(resolve_source(source), images)
    return held, held_out


def evaluate_artifacts(models: Sequence[str], data: Optional[str] = None, imgsz: Optional[int] = None,
                       batch: int = 16, max_images: Optional[int] = None, split: str = "val",
                       teacher: Optional[str] = None, fidelity_images: int = 64, fidelity_source: Optional[str] = None,
                       device: str = "auto", workdir: Optional[Path] = None, rect: bool = False
                       ) -> List[Dict[str, Any]]:
    """One row per model: {model, format, task, imgsz, metrics..., time_s}. rect=False (default) letterboxes every
    image to the square imgsz for every model, so torch rows compare with fixed-shape exports (which are always
    square); rect=True gives the numbers of `yolo val` for torch models."""
    from act.run.build import load_frozen, select_device
    from act.blocks.distill import find_nodes
    from act.blocks.evaluate import CocoEvaluator, EvalContext
    from act.blocks.fidelity import FidelityEvaluator

    if not data and not teacher:
        raise ConfigError("act eval: give --data (labeled data yaml) and/or --teacher (label-free fidelity)")
    if data and not Path(data).is_file():
        raise ConfigError(f"act eval: data yaml not found: {data}")
    if teacher and not (fidelity_source or data):
        raise ConfigError("act eval: --teacher needs images: --fidelity-source, or --data (its train split)")
    dev = select_device(device)
    artifacts = [load_artifact(m) for m in models]  # fail on a missing file before any work
    t_model = t_nodes = None
    if teacher:
        t_model, family, _ = load_frozen(teacher)
        t_model.to(dev)
        t_nodes = find_nodes(t_model, family)
        f_paths, held_out = fidelity_paths(fidelity_source or data, fidelity_images)
    rows = []
    fid_cache: Dict[int, Any] = {}
    for art in artifacts:
        size = imgsz or art.imgsz or 640
        row: Dict[str, Any] = {"model": art.spec, "format": art.kind, "task": art.task, "imgsz": size}
        ctx = EvalContext(dev, size, 0, workdir)
        model = art.model.to(dev) if isinstance(art.model, nn.Module) else art.model
        t0 = time.time()
        if data:
            ev = CocoEvaluator(data, art.task, size, batch, max_images, split, workdir=workdir, rect=rect)
            row.update(ev(model, ctx))
        if teacher:
            if size not in fid_cache:
                fid_cache[size] = FidelityEvaluator.from_paths(t_model, f_paths, size, art.task, family=family,
                                                               nodes=t_nodes, batch_size=batch, held_out=held_out)
            row.update(fid_cache[size](model, ctx))
        row["time_s"] = round(time.time() - t0, 2)
        rows.append(row)
    return rows


# ---- table --------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("model", "model"),
    ("format", "format"),
    ("imgsz", "imgsz"),
    ("pose_map50_95", "pose mAP50-95"),
    ("pose_map50", "pose mAP50"),
    ("box_map50_95", "box mAP50-95"),
    ("box_map50", "box mAP50"),
    ("fidelity_pose_map50_95", "fidelity pose mAP"),
    ("fidelity_box_map50_95", "fidelity box mAP"),
    ("fidelity_snr_db_mean", "head SNR dB"),
    ("time_s", "time s"),
]


def format_cell(v: Any, big: str = ".1f") -> str:
    """A table cell: '-' for None, nan / inf spelled out, floats with 4 decimals below 10 and `big` above."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.4f}" if abs(v) < 10 else format(v, big)
    return str(v)


def markdown_table(rows: Sequence[Dict[str, Any]], columns=COLUMNS) -> str:
    """A markdown table of the columns that at least one row has."""
    cols = [(k, h) for k, h in columns if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(format_cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_json(obj: Any, path: Union[str, Path]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
