"""Ultralytics YOLOv8 / YOLO11 (detect and pose): loading, head branches, float-only layers, export metadata."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from act.errors import ModelError

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics must never reach for the network from act

SUPPORTED_HEADS = ("Detect", "Pose")

# Branch attributes of the head, in the order Ultralytics concatenates them.
BRANCHES = {"cv2": "box", "cv3": "cls", "cv4": "kpt"}
# the attribute holding the conv that produces a block's output channels (Conv: its conv; the C2f family and SPPF end
# in cv2, the C3 family in cv3; SplitC2f is act's prunable C2f, teachers/ultralytics_prune.py)
OUTPUT_CONV = {"Conv": "conv", "C2f": "cv2", "C3k2": "cv2", "SplitC2f": "cv2", "SPPF": "cv2", "C2PSA": "cv2",
               "C3": "cv3", "C3k": "cv3", "C3x": "cv3"}


class UltralyticsYOLO:
    name = "ultralytics-yolo"

    # The decode stays in float: DFL's fixed conv, and everything after the last conv of each branch
    # (sigmoid, anchor/stride arithmetic) is not a conv and so is never quantized.
    float_patterns = ("*.dfl", "*.dfl.*")

    # Q/DQ placement (act.quant.placement): the rules TensorRT needs to fuse an Ultralytics YOLO without reformats
    default_placement = "tensorrt"
    placement_rules = {"concat": True, "residual_add": True, "maxpool": True, "upsample": True, "fanout": True}

    def insert_block_quantizers(self, model: nn.Module, rules: Dict[str, bool], factory) -> List[str]:
        """Quantizers at the Concat / residual Add / Upsample inputs of Ultralytics blocks (ultralytics_blocks)."""
        from teachers.ultralytics_blocks import insert_block_quantizers

        return insert_block_quantizers(model, rules, factory)

    # ---- loading -------------------------------------------------------------------------------------------------
    def load(self, path: Path, kind: str = "pt") -> nn.Module:
        """Load an Ultralytics checkpoint (or build a yaml) and return its nn.Module in FP32, eval mode."""
        from ultralytics import YOLO

        path = Path(path)
        if kind == "pt" and not path.is_file():
            raise ModelError(f"model file not found: {path}")
        if kind == "pt":
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:  # not a torch file at all
                raise ModelError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
                found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
                raise ModelError(
                    f"{path} is not an Ultralytics checkpoint: expected a dict with a 'model' module, found {found}"
                )
        try:
            model = YOLO(str(path)).model
        except Exception as e:
            raise ModelError(f"Ultralytics could not load {path}: {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"{path} did not load as a torch model (got {type(model).__name__})")
        self.check_supported(model, path)
        model = model.float().eval()
        return model

    def fold_batchnorm(self, model: nn.Module) -> nn.Module:
        model.fuse(verbose=False)
        return model

    def head(self, model: nn.Module) -> nn.Module:
        return model.model[-1]

    def check_supported(self, model: nn.Module, where="model") -> None:
        seq = getattr(model, "model", None)
        if not isinstance(seq, nn.Sequential) or len(seq) == 0:
            raise ModelError(f"{where}: not an Ultralytics detection model (no layer sequence found)")
        head = seq[-1]
        kind = type(head).__name__
        if kind not in SUPPORTED_HEADS:
            raise ModelError(
                f"{where}: unsupported head {kind!r}; act supports Ultralytics {' and '.join(SUPPORTED_HEADS)} heads"
            )
        if getattr(head, "one2one_cv2", None) is not None:
            raise ModelError(f"{where}: end-to-end (NMS-free) {kind} heads are not supported yet")

    def task(self, model: nn.Module) -> str:
        return "pose" if type(self.head(model)).__name__ == "Pose" else "detect"

    # ---- knowledge used by compression --------------------------------------------------------------------------
    def head_branches(self, model: nn.Module) -> List[Tuple[str, str, int]]:
        """(module name, branch type, level) of the last conv of each head branch: box/cls(/kpt) x every stride."""
        head = self.head(model)
        head_name = self._name_of(model, head)
        out = []
        for attr, kind in BRANCHES.items():
            branch = getattr(head, attr, None)
            if branch is None:
                continue
            for level, seq in enumerate(branch):
                last = seq[-1]
                if not isinstance(last, nn.Conv2d):
                    raise ModelError(f"{head_name}.{attr}.{level}: expected the branch to end in a Conv2d")
                out.append((f"{head_name}.{attr}.{level}.{len(seq) - 1}", kind, level))
        return out

    def feature_nodes(self, model: nn.Module) -> List[Tuple[str, int]]:
        """(module name, level) of the layers whose outputs the head reads (its `f`): the neck output of each pyramid
        level (yolo11n: model.16 / 19 / 22), the feature maps `distill.features: auto` distills."""
        head = self.head(model)
        return [(f"model.{i}", level) for level, i in enumerate(head.f)]

    @staticmethod
    def output_conv(module: nn.Module) -> Optional[nn.Conv2d]:
        """The Conv2d whose output channels are `module`'s output channels: a conv itself, or the last conv of the
        Ultralytics blocks in OUTPUT_CONV; None for any other module (its channels cannot be followed)."""
        if isinstance(module, nn.Conv2d):
            return module
        # by class or base class (quant placement subclasses blocks, e.g. QuantSplitC2f)
        attr = next((OUTPUT_CONV[c.__name__] for c in type(module).__mro__ if c.__name__ in OUTPUT_CONV), None)
        sub = getattr(module, attr, None) if attr else None
        if isinstance(sub, nn.Conv2d):
            return sub
        return sub.conv if isinstance(getattr(sub, "conv", None), nn.Conv2d) else None

    @staticmethod
    def _name_of(model: nn.Module, module: nn.Module) -> str:
        for n, m in model.named_modules():
            if m is module:
                return n
        raise ModelError("head module not found in model")

    def prepare_for_export(self, model: nn.Module, dynamic: bool = False) -> None:
        """Switch the head to export mode: one decoded output tensor (B, 4+nc(+nk), anchors)."""
        head = self.head(model)
        head.export = True
        head.format = "onnx"
        head.dynamic = dynamic
        for m in model.modules():
            if hasattr(m, "export") and m is not head:
                try:
                    m.export = True
                except Exception:
                    pass

    def restore_after_export(self, model: nn.Module) -> None:
        for m in model.modules():
            if hasattr(m, "export"):
                try:
                    m.export = False
                except Exception:
                    pass
        head = self.head(model)
        head.format = None
        head.dynamic = False

    def export_metadata(self, model: nn.Module, imgsz: int, batch: int, extra: Dict | None = None) -> Dict:
        """Ultralytics' own export metadata, so that `YOLO('student.onnx')` knows task, names, stride, kpt_shape."""
        from ultralytics import __version__

        head = self.head(model)
        meta = {
            "description": f"act INT8 Q/DQ student of Ultralytics {Path(str(model.yaml.get('yaml_file', 'YOLO'))).stem}",
            "author": "act (Ultralytics-compatible)",
            "date": datetime.now().astimezone().isoformat(),
            "version": __version__,
            "license": "AGPL-3.0 License (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com",
            "stride": int(max(model.stride)),
            "task": self.task(model),
            "head": type(head).__name__,
            "batch": batch,
            "imgsz": [imgsz, imgsz],
            "names": model.names,
            "args": {"batch": batch, "half": False, "int8": True, "dynamic": False, "nms": False},
            "channels": model.yaml.get("channels", 3),
            "end2end": False,
        }
        if meta["task"] == "pose":
            meta["kpt_shape"] = list(head.kpt_shape)
        if extra:
            meta.update(extra)
        return meta


    # ---- structured pruning (act.prune; details in teachers/ultralytics_prune.py) ----------------------------------
    def prune_ignored(self, model: nn.Module, keep_branches=()) -> List[nn.Module]:
        from teachers.ultralytics_prune import prune_ignored

        return prune_ignored(self, model, keep_branches)

    def prepare_for_pruning(self, model: nn.Module) -> nn.Module:
        from teachers.ultralytics_prune import split_c2f_blocks

        split_c2f_blocks(model)
        return model

    def prune_forward(self, model: nn.Module, x: torch.Tensor):
        from teachers.ultralytics_prune import prune_forward

        return prune_forward(model, x)
