"""The Ultralytics YOLOv8 / YOLO11 family (detect and pose), act's built-in `ModelFamily` (act/core/family.py): loading,
head branches, float-only layers, Ultralytics' letterbox / NMS / validators / AutoBackend / ONNX exporter, export
metadata and checkpoint layout. Q/DQ placement inside its blocks: blocks.py; what pruning needs: prune.py."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from act.core.errors import ModelError
from act.core.family_base import FamilyBase
from families.ultralytics.layout import BRANCHES, OUTPUT_CONV, SUPPORTED_HEADS  # noqa: F401

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics must never reach for the network from act

class UltralyticsYOLO(FamilyBase):
    name = "ultralytics-yolo"

    # The decode stays in float: DFL's fixed conv, and everything after the last conv of each branch
    # (sigmoid, anchor/stride arithmetic) is not a conv and so is never quantized.
    float_patterns = ("*.dfl", "*.dfl.*")
    sample_images = "pkg:ultralytics/assets"  # bus.jpg, zidane.jpg: parity images when no run config names a pool

    # Q/DQ placement (act.blocks.quant.placement): the rules TensorRT needs to fuse an Ultralytics YOLO without reformats
    default_placement = "tensorrt"
    placement_rules = {"concat": True, "residual_add": True, "maxpool": True, "upsample": True, "fanout": True}

    def insert_block_quantizers(self, model: nn.Module, rules: Dict[str, bool], factory) -> List[str]:
        """Quantizers at the Concat / residual Add / Upsample inputs of Ultralytics blocks (blocks.py)."""
        from families.ultralytics.blocks import insert_block_quantizers

        return insert_block_quantizers(model, rules, factory)

    # ---- which models, and loading -------------------------------------------------------------------------------
    def claims(self, model: nn.Module) -> bool:
        """An Ultralytics model (a teacher, or a student copied from one): its class comes from ultralytics, or its
        layer sequence ends in a Detect head (or a subclass: check_supported then says which heads act supports)."""
        if type(model).__module__.startswith("ultralytics."):
            return True
        seq = getattr(model, "model", None)
        return (isinstance(seq, nn.Sequential) and len(seq) > 0
                and any(c.__name__ == "Detect" for c in type(seq[-1]).__mro__))

    def resolves_architecture(self, name: str) -> bool:
        """Ultralytics' own architecture yamls (e.g. yolov8n-pose.yaml: scale 'n' of yolov8-pose.yaml), offline."""
        from ultralytics.nn.tasks import yaml_model_load

        try:
            return bool(yaml_model_load(name))
        except Exception:
            return False

    def fetch_weights(self, file: str, folder) -> Optional[Path]:
        """Ultralytics' own asset download (as `YOLO('yolov8s-pose.pt')` does), into `folder`; None when offline.
        act keeps YOLO_OFFLINE=1 for Ultralytics otherwise (the caller checked that the user did not set it)."""
        from ultralytics.utils import is_online
        from ultralytics.utils.downloads import attempt_download_asset

        before = os.environ.pop("YOLO_OFFLINE", None)
        try:
            if not is_online():
                return None
            Path(folder).mkdir(parents=True, exist_ok=True)
            path = Path(attempt_download_asset(Path(folder) / file))
        except Exception:  # a failed download: the caller says where to put the file
            return None
        finally:
            if before is not None:
                os.environ["YOLO_OFFLINE"] = before
        return path if path.is_file() else None

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
        """Ultralytics' own fuse (Conv/DWConv/RepConv... BatchNorm folded into the conv), in eval mode."""
        was = model.training
        model.eval()
        model.fuse(verbose=False)
        model.train(was)
        return model

    def load_for_inference(self, path, device):
        """Ultralytics' AutoBackend (onnxruntime for .onnx, TensorRT for .engine, torch for .pt, ...)."""
        import contextlib
        import io

        from ultralytics.nn.autobackend import AutoBackend

        with contextlib.redirect_stdout(io.StringIO()):
            return AutoBackend(str(path), device=device, verbose=False)

    def head(self, model: nn.Module) -> nn.Module:
        return model.model[-1]

    def num_classes(self, model: nn.Module) -> int:
        return int(getattr(self.head(model), "nc", 1))

    def keypoint_shape(self, model: nn.Module) -> Tuple[int, ...]:
        return tuple(getattr(self.head(model), "kpt_shape", None) or ()) if self.task(model) == "pose" else ()

    def dfl_bins(self, model: nn.Module) -> int:
        return int(getattr(self.head(model), "reg_max", 16))

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

    # ---- pre- and post-processing (Ultralytics' own) --------------------------------------------------------------
    def letterbox(self, image, imgsz: int):
        """Ultralytics' LetterBox(auto=False): the square letterbox of `yolo val` / `yolo predict` on exports."""
        from ultralytics.data.augment import LetterBox

        return LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True, stride=32)(image=image)

    def pil_open(self, path):
        """PIL's own Image.open: Ultralytics patches it to pip-install a HEIF plugin on any unidentified file."""
        from PIL import Image

        try:
            from ultralytics.utils import patches

            return getattr(patches, "_image_open", Image.open)(path)
        except ImportError:
            return Image.open(path)

    def nms(self, pred: torch.Tensor, conf: float, iou: float, nc: int, multi_label: bool = False,
            max_det: int = 300) -> List[torch.Tensor]:
        from ultralytics.utils.nms import non_max_suppression

        return non_max_suppression(pred, conf, iou, nc=nc, multi_label=multi_label, max_det=max_det)

    def pseudo_label_loss(self, model: nn.Module, nodes, cfg):
        from families.ultralytics.pseudo_labels import PseudoLabelLoss

        return PseudoLabelLoss(self.head(model), self.task(model), nodes, cfg.conf, cfg.iou, cfg.kpt_conf)

    def oks_sigmas(self, nk: int):
        import numpy as np
        from ultralytics.utils.metrics import OKS_SIGMA

        return OKS_SIGMA.astype(np.float64) if nk == 17 else np.ones(nk) / nk

    def labeled_metrics(self, model, data: str, task: str, imgsz: int, batch_size: int, split: str, device,
                        workdir, rect: bool = True) -> Dict[str, float]:
        """Ultralytics' Detection/PoseValidator, the same code as `yolo val` (validate.py)."""
        from families.ultralytics.validate import labeled_metrics

        return labeled_metrics(model, data, task, imgsz, batch_size, split, device, workdir, rect)

    # ---- export and checkpoints ----------------------------------------------------------------------------------
    def export_onnx(self, model: nn.Module, im: torch.Tensor, path, opset: int, input_names: List[str],
                    output_names: List[str], dynamic: Optional[Dict] = None) -> None:
        """Ultralytics' torch2onnx, as `yolo export format=onnx` traces."""
        from ultralytics.utils.export.engine import torch2onnx

        torch2onnx(model, im, path, opset=opset, input_names=input_names, output_names=output_names,
                   dynamic=dynamic)

    def checkpoint(self, model: nn.Module, act_state: Dict, train_args: Optional[Dict] = None) -> Dict:
        """Ultralytics' own keys (`model` holds the module, `train_args`, `date`, `version`), so `YOLO()` loads it,
        plus `act` with the training state."""
        from ultralytics import __version__

        return {"date": datetime.now().isoformat(), "version": __version__, "model": model,
                "train_args": train_args or {}, "act": act_state}

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


    # ---- structured pruning (act.blocks.prune; details in prune.py) ---------------------------------------------------
    def prune_ignored(self, model: nn.Module, keep_branches=()) -> List[nn.Module]:
        from families.ultralytics.prune import prune_ignored

        return prune_ignored(self, model, keep_branches)

    def prepare_for_pruning(self, model: nn.Module) -> nn.Module:
        from families.ultralytics.prune import split_c2f_blocks

        split_c2f_blocks(model)
        return model

    def prune_forward(self, model: nn.Module, x: torch.Tensor):
        from families.ultralytics.prune import prune_forward

        return prune_forward(model, x)
