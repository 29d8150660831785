"""Labeled COCO-style mAP with Ultralytics' validators (the same code as `yolo val`), for act.blocks.evaluate.CocoEvaluator."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from act.core.errors import ActError

# Ultralytics' result keys -> act's names
KEYS = {
    "metrics/mAP50-95(P)": "pose_map50_95",
    "metrics/mAP50(P)": "pose_map50",
    "metrics/mAP50-95(B)": "box_map50_95",
    "metrics/mAP50(B)": "box_map50",
}


def _validator(data: str, task: str, imgsz: int, batch_size: int, split: str, device, workdir: Path, rect: bool):
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.models.yolo.pose import PoseValidator

    cls = PoseValidator if task == "pose" else DetectionValidator
    dev = "cpu" if device is None or torch.device(device).type == "cpu" else str(torch.device(device).index or 0)
    args = dict(task=task, data=data, imgsz=imgsz, batch=batch_size, split=split,
                device=dev, plots=False, save_json=False, verbose=False,
                project=str(workdir), name="val", exist_ok=True, workers=0, rect=rect)
    return cls(args=args, save_dir=Path(workdir) / "val")


def labeled_metrics(model, data: str, task: str, imgsz: int, batch_size: int, split: str, device, workdir,
                    rect: bool = True) -> Dict[str, float]:
    """model: a torch module (evaluated on a copy), or a path to any Ultralytics-loadable artifact (.pt, .onnx,
    .engine). rect: batch images of similar aspect into rectangular inputs (torch models only)."""
    from ultralytics.utils import LOGGER

    validator = _validator(data, task, imgsz, batch_size, split, device, workdir, rect)
    model = copy.deepcopy(model).eval() if isinstance(model, nn.Module) else str(model)
    level = LOGGER.level
    LOGGER.setLevel(40)
    try:
        stats = validator(model=model)
    except ActError:
        raise
    except Exception as e:
        raise ActError(f"evaluation on {data} failed: {type(e).__name__}: {e}") from e
    finally:
        LOGGER.setLevel(level)
    return {act: float(stats[k]) for k, act in KEYS.items() if k in stats}
