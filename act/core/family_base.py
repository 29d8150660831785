"""`FamilyBase`: defaults for a model family (act.core.family.ModelFamily) that need no model library.

A family subclasses it and overrides what differs; at the least `name`, `claims`, `load` and `head_branches`. The
defaults: the head is `model.head` with attributes nc / kpt_shape / reg_max; letterbox with cv2 (as Ultralytics'
LetterBox(auto=False): centred, grey 114 padding); NMS with torchvision; COCO's OKS sigmas; export with
torch.onnx.export; a checkpoint dict holding the module; nothing special for Q/DQ placement or pruning.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from act.core.errors import ActError, ConfigError, ModelError

# COCO's per-keypoint OKS sigmas (person, 17 keypoints), as pycocotools and the COCO keypoint evaluation use them
COCO_OKS_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87,
                            0.89, 0.89]) / 10.0


class FamilyBase:
    name = "base"
    float_patterns: Sequence[str] = ()
    sample_images: Optional[str] = None  # an image source (act.blocks.data) the family ships, for checks without user data
    default_placement = "tensorrt"
    placement_rules = {"concat": True, "residual_add": True, "maxpool": True, "upsample": True, "fanout": True}

    # ---- which models, and loading -------------------------------------------------------------------------------
    def claims(self, model: nn.Module) -> bool:
        return False

    def resolves_architecture(self, name: str) -> bool:
        return False

    def fetch_weights(self, file: str, folder) -> Optional[Path]:
        return None  # (a family without published weights)

    def load(self, path, kind: str = "pt") -> nn.Module:
        """A torch file holding a module, or a dict with one under 'model'."""
        if kind != "pt":
            raise ModelError(f"{self.name}: cannot build a model from {kind} ({path})")
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
        model = obj.get("model") if isinstance(obj, dict) else obj
        if not isinstance(model, nn.Module):
            raise ModelError(f"{path}: expected a module or a dict with a 'model' module")
        return model.float().eval()

    def fold_batchnorm(self, model: nn.Module) -> nn.Module:
        """Folds each `bn` attribute (BatchNorm2d) into the `conv` attribute beside it, as Conv+BN blocks hold them."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        was = model.training
        model.eval()
        for m in model.modules():
            conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                m.conv = fuse_conv_bn_eval(conv, bn)
                m.bn = nn.Identity()
        model.train(was)
        return model

    def load_for_inference(self, path, device) -> Any:
        from act.core.family_runner import OnnxRunner

        path = Path(path)
        if path.suffix != ".onnx":
            raise ModelError(f"{self.name}: runs only .onnx exports (got {path})")
        return OnnxRunner(path)

    def pil_open(self, path) -> Any:
        from PIL import Image

        return Image.open(path)

    # ---- what the head looks like --------------------------------------------------------------------------------
    def head(self, model: nn.Module) -> nn.Module:
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Module):
            raise ModelError(f"{self.name}: {type(model).__name__} has no `head` module")
        return head

    def task(self, model: nn.Module) -> str:
        return "pose" if self.keypoint_shape(model) else "detect"

    def head_branches(self, model: nn.Module) -> List[Tuple[str, str, int]]:
        raise NotImplementedError(f"{self.name}: head_branches")

    def feature_nodes(self, model: nn.Module) -> List[Tuple[str, int]]:
        return []

    def output_conv(self, module: nn.Module) -> Optional[nn.Conv2d]:
        return module if isinstance(module, nn.Conv2d) else None

    def num_classes(self, model: nn.Module) -> int:
        return int(getattr(self.head(model), "nc", 1))

    def keypoint_shape(self, model: nn.Module) -> Tuple[int, ...]:
        return tuple(getattr(self.head(model), "kpt_shape", None) or ())

    def dfl_bins(self, model: nn.Module) -> int:
        return int(getattr(self.head(model), "reg_max", 1))

    # ---- outputs, pre- and post-processing -----------------------------------------------------------------------
    def letterbox(self, image: np.ndarray, imgsz: int) -> np.ndarray:
        """Resize (aspect kept, scale up too) and pad centred with grey 114 to imgsz x imgsz."""
        import cv2

        h, w = image.shape[:2]
        r = min(imgsz / h, imgsz / w)
        nw, nh = max(1, int(round(w * r))), max(1, int(round(h * r)))
        if (w, h) != (nw, nh):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        dw, dh = (imgsz - nw) / 2, (imgsz - nh) / 2
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
        left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
        return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))

    def decoded(self, output: Any) -> torch.Tensor:
        while isinstance(output, (list, tuple)):
            output = output[0]
        return output

    def output_branches(self, model: nn.Module) -> Dict[str, slice]:
        """The decoded output's channel groups: box (4), cls (nc), kpt (the rest, pose models)."""
        nc = self.num_classes(model)
        out = {"box": slice(0, 4), "cls": slice(4, 4 + nc)}
        if self.keypoint_shape(model):
            out["kpt"] = slice(4 + nc, None)
        return out

    def nms(self, pred: torch.Tensor, conf: float, iou: float, nc: int, multi_label: bool = False,
            max_det: int = 300) -> List[torch.Tensor]:
        """torchvision's batched NMS on (B, 4 + nc + extra, anchors), boxes cx cy w h; per image rows
        x1 y1 x2 y2 conf cls extra."""
        from torchvision.ops import batched_nms, box_convert

        out = []
        for p in pred.transpose(1, 2):  # (anchors, 4 + nc + extra)
            box = box_convert(p[:, :4], "cxcywh", "xyxy")
            cls, extra = p[:, 4:4 + nc], p[:, 4 + nc:]
            if multi_label:
                i, j = (cls > conf).nonzero(as_tuple=True)
                rows = torch.cat([box[i], cls[i, j, None], j[:, None].float(), extra[i]], 1)
            else:
                score, j = cls.max(1, keepdim=True)
                rows = torch.cat([box, score, j.float(), extra], 1)[score[:, 0] > conf]
            keep = batched_nms(rows[:, :4], rows[:, 4], rows[:, 5].long(), iou)[:max_det]
            out.append(rows[keep])
        return out

    def pseudo_label_loss(self, model: nn.Module, nodes, cfg) -> Callable:
        """`distill.pseudo_labels`: `(student_out, teacher_out) -> loss` of the family's own training loss against
        the teacher's detections, read from the distillation nodes."""
        raise ConfigError(f"invalid config:\n  distill.pseudo_labels: the {self.name} family has no training loss "
                          "for pseudo-labels")

    def oks_sigmas(self, nk: int) -> np.ndarray:
        return COCO_OKS_SIGMAS.astype(np.float64) if nk == 17 else np.ones(nk) / nk

    def default_metric(self, task: str) -> str:
        return "pose_map50_95" if task == "pose" else "box_map50_95"

    def labeled_metrics(self, model, data: str, task: str, imgsz: int, batch_size: int, split: str, device,
                        workdir, rect: bool = True) -> Dict[str, float]:
        raise ActError(f"model family {self.name!r} has no labeled evaluation (eval.data); use eval.fidelity or "
                       "eval.callback")

    # ---- export and checkpoints ----------------------------------------------------------------------------------
    def prepare_for_export(self, model: nn.Module, dynamic: bool = False) -> None:
        pass

    def restore_after_export(self, model: nn.Module) -> None:
        pass

    def export_onnx(self, model: nn.Module, im: torch.Tensor, path, opset: int, input_names: List[str],
                    output_names: List[str], dynamic: Optional[Dict] = None) -> None:
        torch.onnx.export(model, im, str(path), opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, dynamo=False)

    def export_metadata(self, model: nn.Module, imgsz: int, batch: int, extra: Optional[Dict] = None) -> Dict:
        meta = {"author": "act", "date": datetime.now().astimezone().isoformat(), "family": self.name,
                "task": self.task(model), "batch": batch, "imgsz": [imgsz, imgsz],
                "args": {"batch": batch, "half": False, "int8": True, "dynamic": False, "nms": False}}
        if meta["task"] == "pose":
            meta["kpt_shape"] = list(self.keypoint_shape(model))
        meta.update(extra or {})
        return meta

    def checkpoint(self, model: nn.Module, act_state: Dict[str, Any], train_args: Optional[Dict] = None) -> Dict:
        return {"date": datetime.now().isoformat(), "model": model, "train_args": train_args or {}, "act": act_state}

    # ---- quantization and pruning --------------------------------------------------------------------------------
    def insert_block_quantizers(self, model: nn.Module, rules: Dict[str, bool],
                                factory: Callable[[], nn.Module]) -> List[str]:
        return []

    def prepare_for_pruning(self, model: nn.Module) -> nn.Module:
        return model

    def prune_ignored(self, model: nn.Module, keep_branches: Sequence[str] = ()) -> List[nn.Module]:
        names = {n for n, _, _ in self.head_branches(model)}
        return [m for n, m in model.named_modules() if n in names]

    def prune_forward(self, model: nn.Module, x: torch.Tensor) -> Any:
        return model(x)
