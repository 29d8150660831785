"""The model-family protocol (act/core/family.py): a toy family defined here, registered with `register_family` alone,
runs `act compress` end to end; act/ imports no model library (ultralytics) itself."""

import ast
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from act.core.errors import ModelError
from act.core.family import (ModelFamily, default_family, family_for, family_named, families, register_family,
                        unregister_family)
from act.core.family_base import FamilyBase

REPO = Path(__file__).resolve().parents[1]
REG_MAX = 16
STRIDES = (4, 8)


# ---- the toy family -----------------------------------------------------------------------------------------------
def _branch(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, c_out, 1))


class ToyHead(nn.Module):
    """Per stride: a box branch (4 sides x REG_MAX bins, decoded by the expectation of a softmax) and a class
    branch, each ending in a Conv2d; output (B, 4 + nc, anchors), boxes cx cy w h in pixels."""

    def __init__(self, nc: int = 2, channels=(16, 16)):
        super().__init__()
        self.nc, self.reg_max = nc, REG_MAX
        self.box = nn.ModuleList(_branch(c, 4 * REG_MAX) for c in channels)
        self.cls = nn.ModuleList(_branch(c, nc) for c in channels)

    def forward(self, feats):
        out = []
        for box, cls, x, s in zip(self.box, self.cls, feats, STRIDES):
            b, _, h, w = x.shape
            d = box(x).view(b, 4, REG_MAX, h * w).softmax(2)
            ltrb = (d * torch.arange(REG_MAX, dtype=d.dtype, device=d.device).view(1, 1, -1, 1)).sum(2) * s
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            cx, cy = (xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s
            x1, y1, x2, y2 = cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]
            boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)
            out.append(torch.cat([boxes, cls(x).flatten(2).sigmoid()], 1))
        return torch.cat(out, 2)


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.head = ToyHead()

    def forward(self, x):
        p4 = self.stem(x)
        return self.head([p4, self.down(p4)])


class ToyFamily(FamilyBase):
    name = "toy"
    default_placement = "conv"

    def claims(self, model):
        return isinstance(model, ToyNet)

    def load(self, path, kind="pt"):
        model = ToyNet()
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.float().eval()

    def head_branches(self, model):
        return [(f"head.{attr}.{lvl}.2", kind, lvl) for attr, kind in (("box", "box"), ("cls", "cls"))
                for lvl in range(len(STRIDES))]

    def feature_nodes(self, model):
        return [("stem", 0), ("down", 1)]

    def letterbox(self, image, imgsz):
        h, w = image.shape[:2]
        r = min(imgsz / h, imgsz / w)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        top, left = (imgsz - nh) // 2, (imgsz - nw) // 2
        return cv2.copyMakeBorder(image, top, imgsz - nh - top, left, imgsz - nw - left, cv2.BORDER_CONSTANT,
                                  value=(114, 114, 114))

    def nms(self, pred, conf, iou, nc, multi_label=False, max_det=300):
        from torchvision.ops import batched_nms, box_convert

        out = []
        for p in pred.transpose(1, 2):
            score, cls = p[:, 4:4 + nc].max(1)
            keep = score > conf
            boxes, score, cls = box_convert(p[keep, :4], "cxcywh", "xyxy"), score[keep], cls[keep]
            i = batched_nms(boxes, score, cls, iou)[:max_det]
            out.append(torch.cat([boxes[i], score[i, None], cls[i, None].float()], 1))
        return out


@pytest.fixture
def toy_family():
    fam = register_family(ToyFamily(), replace=True)
    yield fam
    unregister_family("toy")


@pytest.fixture
def toy_teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "toy.pt"
    torch.save(ToyNet().state_dict(), path)
    return path


@pytest.fixture
def toy_images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        im = rng.integers(0, 255, (48 + 8 * i, 80, 3), dtype=np.uint8)
        cv2.rectangle(im, (10, 10), (40, 30 + i), (255, 255, 255), -1)
        cv2.imwrite(str(folder / f"im{i}.jpg"), im)
    return folder


# ---- the registry -------------------------------------------------------------------------------------------------
def test_builtin_family_satisfies_protocol():
    fam = default_family()
    assert fam.name == "ultralytics-yolo" and family_named("ultralytics-yolo") is fam
    assert isinstance(fam, ModelFamily)
    assert isinstance(ToyFamily(), ModelFamily)


def test_registry_claims_and_errors(toy_family):
    assert family_for(ToyNet()) is toy_family
    assert [f.name for f in families()][-1] == "toy"
    with pytest.raises(ModelError, match="no registered model family claims"):
        family_for(nn.Linear(2, 2))
    with pytest.raises(ModelError, match="unknown model family 'nope'"):
        family_named("nope")
    with pytest.raises(ModelError, match="registered already"):
        register_family(ToyFamily())


def test_resolve_teacher_names_the_family(toy_family, toy_teacher):
    from act.run.build import load_frozen
    from teachers import resolve_teacher

    assert resolve_teacher(str(toy_teacher)).family == "ultralytics-yolo"  # a file: the default family ...
    src = resolve_teacher(str(toy_teacher), "toy")  # ... unless model.family names one
    assert (src.family, src.kind) == ("toy", "pt")
    with pytest.raises(ModelError, match="unknown model family"):
        resolve_teacher(str(toy_teacher), "nope")
    model, fam, _ = load_frozen(str(toy_teacher), "toy")
    assert fam is toy_family and not any(p.requires_grad for p in model.parameters())
    assert fam.task(model) == "detect" and fam.num_classes(model) == 2 and fam.dfl_bins(model) == REG_MAX


def test_toy_fidelity_through_the_family(toy_family, toy_teacher, toy_images):
    """act.blocks.fidelity runs any family: the toy's letterbox and NMS, its own head branches as nodes."""
    import copy

    from act.blocks.distill import find_nodes
    from act.blocks.fidelity import FidelityEvaluator
    from act.run.build import load_frozen

    teacher, fam, _ = load_frozen(str(toy_teacher), "toy")
    ev = FidelityEvaluator.from_paths(teacher, sorted(toy_images.iterdir()), 64, "detect",
                                      nodes=find_nodes(teacher, fam), teacher_conf=0.5)
    assert ev.family is fam and ev.images[0].shape == (64, 64, 3)
    res = ev(copy.deepcopy(teacher))
    assert res["fidelity_cos_min"] == pytest.approx(1.0) and math.isinf(res["fidelity_snr_db_mean"])


# ---- act compress end to end with the toy family --------------------------------------------------------------------
@pytest.mark.slow
def test_toy_family_compresses_end_to_end(toy_family, toy_teacher, toy_images, tmp_path):
    import onnx

    from act.orchestrate.compress import AutoCompression

    cfg = {
        "model": {"teacher": str(toy_teacher), "family": "toy"},
        "data": {"train": str(toy_images), "imgsz": 64, "batch_size": 2, "workers": 0},
        "train": {"iterations": 3, "lr": 1e-4, "log_every": 1, "checkpoint_every": 3, "device": "cpu"},
        "quant": {"calib_batches": 1},
        "eval": {"before": False, "fidelity": {"images": 2}},
        "export": {"parity_images": 2},
        "report": {"enabled": False},
        "strategy": "qat",
        "output_dir": str(tmp_path / "out"),
    }
    summary = AutoCompression(cfg).run()
    assert summary["onnx"]["parity"]["passed"]
    assert summary["nodes"] == [n for n, _, _ in toy_family.head_branches(ToyNet())]
    meta = {p.key: p.value for p in onnx.load(summary["onnx"]["path"]).metadata_props}
    assert meta["family"] == "toy" and meta["task"] == "detect"
    assert summary["onnx"]["qdq"]["conv_quantized"] == summary["onnx"]["qdq"]["conv_total"]


# ---- act/ imports no model library --------------------------------------------------------------------------------
def test_act_imports_no_ultralytics():
    """Everything Ultralytics lives in families/ultralytics; act/ reaches it through act.core.family only."""
    offenders = []
    for f in sorted((REPO / "act").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n == "ultralytics" or n.startswith(("ultralytics.", "families")) for n in names):
                offenders.append(f"{f.relative_to(REPO)}:{node.lineno} {names}")
    assert not offenders, offenders
