"""The model-family interface: everything act needs to know about a kind of model, and the registry of families.

act itself knows no model library: whatever is specific to one (Ultralytics YOLO: its layer sequence, its head, its
loader, NMS, letterbox, validators, exporter, checkpoint layout) lives in a family object, a `ModelFamily`. The
built-in families live in the top-level `families/` package and are registered here by one lazy import string each
(`BUILTIN`); this module imports nothing from them until a family is asked for.

Naming a family (how a teacher gets its loader):

* `model.family` in a run config (default `auto`), passed to `teachers.resolve_teacher(name, family)`: `auto` takes
  the family of the teacher's registry entry (`teachers/registry.yaml`, key `family`), else the first registered
  family that `resolves_architecture` a model yaml name, else `default_family()`; any other value is a registered
  family name (`family_named`), which then loads the teacher file with its own `load(path, kind)`.
* A loaded model: `family_for(model)` asks each registered family, in registration order, whether it `claims(model)`.

A new family (a toy one is in tests/test_family_protocol.py):

    from act.core.family import FamilyBase, register_family

    class MyFamily(FamilyBase):
        name = "mine"
        def claims(self, model): return isinstance(model, MyNet)
        def load(self, path, kind="pt"): ...
        ...
    register_family(MyFamily())

`FamilyBase` (act/core/family_base.py) gives defaults that need no model library (torchvision NMS, a cv2 letterbox,
torch.onnx export, plain checkpoints, no pruning or placement knowledge); a family overrides what differs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch
from torch import nn

from act.core.errors import ModelError

# name -> "module:Class" of the built-in families, imported on first use (one line per family)
BUILTIN: Dict[str, str] = {
    "ultralytics-yolo": "families.ultralytics:UltralyticsYOLO",
}
DEFAULT = "ultralytics-yolo"


@runtime_checkable
class ModelFamily(Protocol):
    """Every member of a model family that act uses. Shapes: images are (B, 3, H, W) float RGB in [0, 1]; the
    decoded output is (B, 4 + nc (+ nk * kdim), anchors), boxes as cx, cy, w, h in input pixels."""

    name: str  # the registry name, e.g. "ultralytics-yolo" (config `model.family`, teachers/registry.yaml `family`)
    float_patterns: Sequence[str]  # module-name globs that stay in float (e.g. the DFL decode)
    default_placement: str  # the Q/DQ placement preset of `quant.placement: auto` (act.blocks.quant.placement)
    placement_rules: Dict[str, bool]  # that preset's rules: concat, residual_add, maxpool, upsample, fanout

    # ---- which models, and loading -------------------------------------------------------------------------------
    def claims(self, model: nn.Module) -> bool:
        """True if `model` (a teacher, a student, a pickled checkpoint's module) belongs to this family."""

    def resolves_architecture(self, name: str) -> bool:
        """True if `name` (e.g. 'yolov8n-pose.yaml') is an architecture this family builds without a file."""

    def fetch_weights(self, file: str, folder) -> Optional[Any]:
        """Download the family's published checkpoint `file` (e.g. 'yolov8s-pose.pt') into `folder` the way its
        library does; the local path, or None when it cannot (offline, unknown file)."""

    def load(self, path, kind: str = "pt") -> nn.Module:
        """The model of a checkpoint (kind 'pt') or an architecture yaml (kind 'yaml'), FP32, eval mode. Raises
        ModelError for anything it cannot load."""

    def fold_batchnorm(self, model: nn.Module) -> nn.Module:
        """Fold every BatchNorm into the conv before it, in place (eval mode); returns the model."""

    def load_for_inference(self, path, device) -> Any:
        """A callable runner of an exported artifact (.onnx, .engine, .pt, ...): `runner(x) -> output` (decoded by
        `decoded`), with attributes task, format, batch, dynamic, imgsz, metadata where known."""

    def pil_open(self, path) -> Any:
        """PIL's Image.open as it was before the family's library patched it, if it did (act.blocks.data reads headers)."""

    # ---- what the head looks like --------------------------------------------------------------------------------
    def task(self, model: nn.Module) -> str:
        """'detect' or 'pose'."""

    def head(self, model: nn.Module) -> nn.Module:
        """The module that produces the (decoded) output."""

    def head_branches(self, model: nn.Module) -> List[Tuple[str, str, int]]:
        """(module name, branch 'box' / 'cls' / 'kpt', pyramid level) of the last Conv2d of each head branch: the
        default distillation nodes."""

    def feature_nodes(self, model: nn.Module) -> List[Tuple[str, int]]:
        """(module name, level) of the feature maps the head reads (`distill.features: auto`)."""

    def output_conv(self, module: nn.Module) -> Optional[nn.Conv2d]:
        """The Conv2d whose output channels are `module`'s output channels, or None."""

    def num_classes(self, model: nn.Module) -> int: ...

    def keypoint_shape(self, model: nn.Module) -> Tuple[int, ...]:
        """(keypoints, values per keypoint) for pose models, () otherwise."""

    def dfl_bins(self, model: nn.Module) -> int:
        """Bins per box side of a distribution (DFL) box branch (reg_max, e.g. 16); 1 for a plain 4-value box."""

    # ---- outputs, pre- and post-processing -----------------------------------------------------------------------
    def letterbox(self, image: np.ndarray, imgsz: int) -> np.ndarray:
        """BGR uint8 HxWx3 -> square imgsz x imgsz BGR uint8, aspect kept, padded (the family's own preprocessing)."""

    def decoded(self, output: Any) -> torch.Tensor:
        """The decoded head output (B, 4 + nc (+ nk), anchors) of a model's (or a runner's) forward in eval mode."""

    def output_branches(self, model: nn.Module) -> Dict[str, slice]:
        """{branch: channel slice of the decoded output}: box, cls (and kpt); parity is checked per branch."""

    def nms(self, pred: torch.Tensor, conf: float, iou: float, nc: int, multi_label: bool = False,
            max_det: int = 300) -> List[torch.Tensor]:
        """Per image: (n, 6 + nk * kdim) rows x1 y1 x2 y2 conf cls [keypoints], from a decoded output."""

    def oks_sigmas(self, nk: int) -> np.ndarray:
        """Per-keypoint OKS sigmas for COCO keypoint evaluation."""

    def pseudo_label_loss(self, model: nn.Module, nodes, cfg) -> Callable:
        """`distill.pseudo_labels` (cfg: that section): `(student_out, teacher_out) -> loss`, the family's own
        training loss against the teacher's detections, both read from the distillation nodes."""

    def default_metric(self, task: str) -> str:
        """The labeled metric that ranks students, e.g. 'pose_map50_95'."""

    def labeled_metrics(self, model, data: str, task: str, imgsz: int, batch_size: int, split: str, device,
                        workdir, rect: bool = True) -> Dict[str, float]:
        """Labeled COCO-style metrics (keys pose_map50_95, pose_map50, box_map50_95, box_map50) of a torch module or
        an artifact path on a labeled data yaml (act.blocks.evaluate.CocoEvaluator)."""

    # ---- export and checkpoints ----------------------------------------------------------------------------------
    def prepare_for_export(self, model: nn.Module, dynamic: bool = False) -> None:
        """Switch `model` (a copy) so that its forward returns the one decoded output tensor the export holds."""

    def restore_after_export(self, model: nn.Module) -> None: ...

    def export_onnx(self, model: nn.Module, im: torch.Tensor, path, opset: int, input_names: List[str],
                    output_names: List[str], dynamic: Optional[Dict] = None) -> None:
        """Trace `model` on `im` to an ONNX file at `path` (act.deploy.export adds Q/DQ simplification, metadata, checks)."""

    def export_metadata(self, model: nn.Module, imgsz: int, batch: int, extra: Optional[Dict] = None) -> Dict:
        """ONNX metadata_props; must hold an 'args' dict (act.deploy.export sets args['int8'] and args['dynamic'])."""

    def checkpoint(self, model: nn.Module, act_state: Dict[str, Any], train_args: Optional[Dict] = None) -> Dict:
        """The checkpoint dict written for a student (already a clean CPU copy): at least 'model' and 'act'."""

    # ---- quantization and pruning --------------------------------------------------------------------------------
    def insert_block_quantizers(self, model: nn.Module, rules: Dict[str, bool],
                                factory: Callable[[], nn.Module]) -> List[str]:
        """Quantizers besides the conv inputs (Concat / residual Add / Upsample inputs, per `rules`); returns the
        names of the modules changed."""

    def prepare_for_pruning(self, model: nn.Module) -> nn.Module:
        """Make the model prunable by torch-pruning, in place (same function)."""

    def prune_ignored(self, model: nn.Module, keep_branches: Sequence[str] = ()) -> List[nn.Module]:
        """Modules whose output channels must stay."""

    def prune_forward(self, model: nn.Module, x: torch.Tensor) -> Any:
        """The forward torch-pruning traces."""


# ---- the registry -------------------------------------------------------------------------------------------------
_REGISTERED: Dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, replace: bool = False) -> ModelFamily:
    """Add a family (an instance) to the registry, after those already there. Returns it."""
    name = getattr(family, "name", None)
    if not isinstance(name, str) or not name:
        raise ModelError(f"register_family: {type(family).__name__} has no name")
    missing = [m for m in ("claims", "load", "task", "head_branches") if not callable(getattr(family, m, None))]
    if missing:
        raise ModelError(f"register_family: family {name!r} lacks {', '.join(missing)} (see act.core.family.ModelFamily)")
    _load_builtins()
    if name in _REGISTERED and not replace and _REGISTERED[name] is not family:
        raise ModelError(f"register_family: a family named {name!r} is registered already")
    _REGISTERED[name] = family
    return family


def unregister_family(name: str) -> None:
    _REGISTERED.pop(name, None)


def _load_builtins() -> None:
    for name, target in BUILTIN.items():
        if name in _REGISTERED:
            continue
        mod, _, cls = target.partition(":")
        try:
            family = getattr(importlib.import_module(mod), cls)()
        except ImportError as e:
            raise ModelError(f"model family {name!r} cannot be imported ({target}: {e})") from None
        _REGISTERED[name] = family


def families() -> List[ModelFamily]:
    """The registered families, built-ins first."""
    _load_builtins()
    return list(_REGISTERED.values())


def family_named(name: str) -> ModelFamily:
    _load_builtins()
    if name not in _REGISTERED:
        raise ModelError(f"unknown model family {name!r}; registered: {', '.join(_REGISTERED)}")
    return _REGISTERED[name]


def default_family() -> ModelFamily:
    """The family of models act assumes where none is at hand (e.g. letterboxing in the data helpers)."""
    return family_named(DEFAULT)


def family_for(model: nn.Module) -> ModelFamily:
    """The first registered family that claims `model`. Raises ModelError if none does."""
    for family in families():
        try:
            if family.claims(model):
                return family
        except Exception:
            continue
    raise ModelError(f"no registered model family claims a {type(model).__name__} "
                     f"(registered: {', '.join(_REGISTERED)}; see act.core.family.register_family)")
