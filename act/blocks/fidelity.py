"""Label-free fidelity: how far a student is from its teacher, with no labels at all.

On unlabeled images (by default a held-out slice of the distillation pool) the teacher and the student both run:

* detection fidelity: the teacher's own detections (conf >= 0.25, after the family's NMS) are the ground truth, the
  student's detections (conf >= 0.001) are scored against them with pycocotools' COCOeval, for boxes and (pose) for
  keypoints with OKS (teacher keypoints with conf > 0.5 count as visible). 1.0 means the student finds what the
  teacher finds. Keys: fidelity_{pose,box}_map50_95, fidelity_{pose,box}_map50.
* head fidelity, per distillation node (torch students only): cosine similarity and SNR in dB,
  10 log10(|t|^2 / |s - t|^2), over all images. Keys: fidelity/cos/<node>, fidelity/snr_db/<node>, and the
  summaries fidelity_cos_min, fidelity_snr_db_mean (an identical student has SNR inf).

`FidelityEvaluator` is an eval callback (`fn(model, context) -> dict`): AutoCompression runs it every eval.every
iterations, `act eval --teacher` runs it on any artifact (a torch module, a .pt, or an .onnx through the family's
`load_for_inference`: Ultralytics' AutoBackend). `CachedFidelity` runs the teacher once on a fixed image set and
measures a changing student against its cached outputs (act.orchestrate.analyze's FidelityProbe). Both share `FidelityMeter`:
the teacher's detections as ground truth, the node SNR / cosine sums, and the two measures.

The model family (act.core.family) answers the head's classes and keypoints, decodes outputs and runs NMS.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from act.blocks.data import load_letterboxed, to_tensor, to_uint8
from act.blocks.distill import FeatureCapture, Node
from act.core.errors import ActError

STUDENT_CONF = 0.001  # as Ultralytics' validators
NMS_IOU = 0.7
MAX_DET = 300
KPT_VISIBLE = 0.5  # teacher keypoint confidence above which a keypoint is a visible (v=2) ground-truth keypoint
KPT_AREA = 0.53  # box area -> keypoint "segment area" for OKS, as Ultralytics' PoseValidator


def _family_of(model: nn.Module, family=None):
    if family is not None:
        return family
    from act.core.family import family_for

    return family_for(model)


class _Runner:
    """Runs a model on letterboxed batches: a torch module (with node capture) or an artifact path (the family's
    `load_for_inference`)."""

    def __init__(self, model: Union[nn.Module, str, Path], device: torch.device, node_names: Sequence[str], family):
        self.capture = None
        self.family = family
        if isinstance(model, nn.Module):
            self.module = model
            self.device = next(model.parameters()).device
            self.step = None
            modules = dict(model.named_modules())
            if node_names and all(n in modules for n in node_names):
                self.capture = FeatureCapture(model, list(node_names))
        else:
            path = Path(model)
            if not path.exists():
                raise ActError(f"model not found: {path}")
            self.module = family.load_for_inference(path, device)
            self.device = getattr(self.module, "device", torch.device("cpu"))
            fixed = getattr(self.module, "format", "pt") != "pt" and not getattr(self.module, "dynamic", False)
            self.step = int(getattr(self.module, "batch", 1) or 1) if fixed else None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor):
        """(decoded output, {node: feature} or {}), on the model's device."""
        x = x.to(self.device)
        if self.step and len(x) > self.step:
            return torch.cat([self.family.decoded(self.module(c)).float() for c in x.split(self.step)]), {}
        y = self.family.decoded(self.module(x))
        feats = self.capture.pop() if self.capture else {}
        return y.float(), feats

    def close(self) -> None:
        if self.capture:
            self.capture.remove()


class FidelityMeter:
    """What both fidelity measurements share: the teacher's family, classes and keypoints, the detections of the
    teacher (ground truth, conf >= teacher_conf) and of a student (conf >= STUDENT_CONF), the per-node sums
    <s,t>, |s|^2, |t|^2, |s-t|^2, and the scores from them."""

    def __init__(self, teacher: nn.Module, task: str, nodes: Sequence[Node] = (), teacher_conf: float = 0.25,
                 family=None):
        self.teacher = teacher
        self.task = task
        self.nodes = list(nodes)
        self.names = [n.name for n in self.nodes]
        self.tags = {n.name: n.tag for n in self.nodes}
        self.teacher_conf = teacher_conf
        self.family = _family_of(teacher, family)
        self.nc = self.family.num_classes(teacher)
        self.kpt_shape = tuple(self.family.keypoint_shape(teacher)) if task == "pose" else ()

    def teacher_detections(self, y: torch.Tensor) -> List[torch.Tensor]:
        return [d.cpu() for d in self.family.nms(y, self.teacher_conf, NMS_IOU, self.nc, max_det=MAX_DET)]

    def student_detections(self, y: torch.Tensor) -> List[torch.Tensor]:
        return [d.cpu() for d in self.family.nms(y, STUDENT_CONF, NMS_IOU, self.nc, multi_label=True,
                                                 max_det=MAX_DET)]

    def new_sums(self) -> Dict[str, np.ndarray]:
        return {n: np.zeros(4) for n in self.names}

    def add_node_sums(self, sums: Dict[str, np.ndarray], t_f: Dict[str, torch.Tensor],
                      s_f: Dict[str, torch.Tensor]) -> None:
        """Add one batch's <s,t>, |s|^2, |t|^2, |s-t|^2 per node (nodes missing or of another shape are skipped)."""
        for n in self.names:
            if n in t_f and n in s_f and t_f[n].shape == s_f[n].shape:
                t, s = t_f[n].double(), s_f[n].to(t_f[n].device).double()
                sums[n] += np.array([float((s * t).sum()), float((s * s).sum()), float((t * t).sum()),
                                     float(((s - t) ** 2).sum())])

    def scores(self, sums: Dict[str, np.ndarray], gts: Optional[List[torch.Tensor]] = None,
               dts: Optional[List[torch.Tensor]] = None, hw=None) -> Dict[str, float]:
        """node_fidelity of the sums, and coco_fidelity of the detections when given."""
        out: Dict[str, float] = {}
        if gts is not None and dts is not None:
            out.update(coco_fidelity(gts, dts, hw, self.kpt_shape, self.family.oks_sigmas))
        out.update(node_fidelity(sums, self.tags))
        return out


class FidelityEvaluator(FidelityMeter):
    """Student vs teacher on unlabeled images. Call as `fn(model, context)`; `model` is a torch module or a path."""

    def __init__(self, teacher: nn.Module, images: List[np.ndarray], task: str, nodes: Sequence[Node] = (),
                 batch_size: int = 16, teacher_conf: float = 0.25, held_out: bool = True,
                 paths: Sequence[Path] = (), family=None, student_images: Optional[List[np.ndarray]] = None):
        """student_images: the same images letterboxed to the student's own (smaller) input size; the student's
        detections are then scaled to the teacher's letterbox (a square letterbox scales every coordinate by the
        size ratio) and scored against the teacher's at its size. Head fidelity needs equal sizes and is skipped."""
        if not images:
            raise ActError("fidelity: no images")
        super().__init__(teacher, task, nodes, teacher_conf, family)
        self.images = images
        self.student_images = student_images
        if student_images is not None and len(student_images) != len(images):
            raise ActError("fidelity: the student's images are not the teacher's")
        self.batch_size = batch_size
        self.held_out = held_out
        self.paths = list(paths)

    @classmethod
    def from_paths(cls, teacher: nn.Module, paths: Sequence[Path], imgsz: int, task: str, family=None,
                   student_imgsz: Optional[int] = None, **kw) -> "FidelityEvaluator":
        """The teacher at `imgsz`; a student of another input size at `student_imgsz`."""
        family = _family_of(teacher, family)
        images, ok = load_letterboxed(paths, imgsz, family.letterbox)
        small = None
        if student_imgsz and student_imgsz != imgsz:
            small, _ = load_letterboxed(ok, student_imgsz, family.letterbox)
        return cls(teacher, images, task, paths=ok, family=family, student_images=small, **kw)

    # ------------------------------------------------------------------------------------------------------------
    def batches(self, images: Optional[List[np.ndarray]] = None):
        images = self.images if images is None else images
        for i in range(0, len(images), self.batch_size):
            yield torch.stack([to_tensor(im) for im in images[i:i + self.batch_size]])

    def __call__(self, model, context=None) -> Dict[str, float]:
        if model is self.teacher:
            return {}  # the teacher against itself: nothing to measure (a copy of it scores 1.0 and SNR inf)
        if self.student_images is not None:
            return self._other_size(model, context)
        device = context.device if context is not None else next(self.teacher.parameters()).device
        t_run = _Runner(self.teacher, device, self.names, self.family)
        s_run = _Runner(model, device, self.names, self.family)
        was = [(m, m.training) for m in (self.teacher, model) if isinstance(m, nn.Module)]
        for m, _ in was:
            m.eval()
        sums = self.new_sums()
        gts: List[torch.Tensor] = []
        dts: List[torch.Tensor] = []
        try:
            for x in self.batches():
                t_y, t_f = t_run(x)
                s_y, s_f = s_run(x)
                if t_y.shape != s_y.shape:
                    raise ActError(f"fidelity: the model's output {tuple(s_y.shape)} does not match the teacher's "
                                   f"{tuple(t_y.shape)} (same task, classes and image size?)")
                s_y = s_y.to(t_y.device)
                gts += self.teacher_detections(t_y)
                dts += self.student_detections(s_y)
                self.add_node_sums(sums, t_f, s_f)
        finally:
            t_run.close()
            s_run.close()
            for m, w in was:
                m.train(w)
        return self.scores(sums, gts, dts, self.images[0].shape[:2])

    def _other_size(self, model, context=None) -> Dict[str, float]:
        """The teacher at its size, the student at its own, the student's detections scaled to the teacher's."""
        device = context.device if context is not None else next(self.teacher.parameters()).device
        scale = self.images[0].shape[0] / self.student_images[0].shape[0]
        gts: List[torch.Tensor] = []
        dts: List[torch.Tensor] = []
        for m, imgs, out, detect in ((self.teacher, self.images, gts, self.teacher_detections),
                                     (model, self.student_images, dts, self.student_detections)):
            run = _Runner(m, device, (), self.family)
            was = m.training if isinstance(m, nn.Module) else None
            if was is not None:
                m.eval()
            try:
                for x in self.batches(imgs):
                    out += detect(run(x)[0])
            finally:
                run.close()
                if was is not None:
                    m.train(was)
        dts = [scale_detections(d, scale, self.kpt_shape) for d in dts]
        return self.scores(self.new_sums(), gts, dts, self.images[0].shape[:2])


def scale_detections(d: torch.Tensor, scale: float, kpt_shape=()) -> torch.Tensor:
    """Detections (rows x1 y1 x2 y2 conf cls [kpts]) with their box and keypoint coordinates times `scale`."""
    d = d.clone()
    d[:, :4] *= scale
    if kpt_shape and d.shape[1] > 6 and len(d):
        nk, dims = kpt_shape
        k = d[:, 6:6 + nk * dims].reshape(len(d), nk, dims).clone()
        k[..., :2] *= scale
        d[:, 6:6 + nk * dims] = k.reshape(len(d), nk * dims)
    return d


class CachedFidelity(FidelityMeter):
    """A fixed image set whose teacher outputs (node features and detections) are computed once, against which
    `measure()` scores `student` as it is now (e.g. with some quantizers toggled): node sums always, detection
    fidelity when asked. Counts its student forwards in `forwards`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, nodes: Sequence[Node], images: List[np.ndarray],
                 task: str, device: torch.device, batch_size: int = 16, teacher_conf: float = 0.25, family=None):
        if not images:
            raise ActError("fidelity: no images to measure on")
        super().__init__(teacher, task, nodes, teacher_conf, family)
        self.student = student
        self.device = device
        self.hw = images[0].shape[:2]
        self.batches = [torch.stack([to_uint8(im) for im in images[i:i + batch_size]])
                        for i in range(0, len(images), batch_size)]
        cap = FeatureCapture(teacher, self.names)
        self.t_feats: List[Dict[str, torch.Tensor]] = []
        self.gts: List[torch.Tensor] = []
        was = teacher.training
        teacher.eval()
        try:
            with torch.inference_mode():
                for x in self.batches:
                    y = self.family.decoded(teacher(x.to(device).float() / 255.0)).float()
                    self.t_feats.append({k: v.float().clone() for k, v in cap.pop().items()})
                    self.gts += self.teacher_detections(y)
        finally:
            cap.remove()
            teacher.train(was)
        self.capture = FeatureCapture(student, self.names)
        self.forwards = 0

    def close(self) -> None:
        self.capture.remove()

    @torch.inference_mode()
    def run_student(self, detections: bool):
        """(node sums, student detections or None) of the student as it is now, in eval mode."""
        was = self.student.training
        self.student.eval()
        sums = self.new_sums()
        dts: List[torch.Tensor] = []
        try:
            for x, t_f in zip(self.batches, self.t_feats):
                y = self.family.decoded(self.student(x.to(self.device).float() / 255.0)).float()
                s_f = self.capture.pop()
                self.forwards += 1
                self.add_node_sums(sums, t_f, s_f)
                if detections:
                    dts += self.student_detections(y)
        finally:
            self.student.train(was)
        return sums, (dts if detections else None)

    def measure(self, detections: bool = True) -> Dict[str, float]:
        sums, dts = self.run_student(detections)
        return self.scores(sums, self.gts if detections else None, dts, self.hw)


# ---- the two measures ---------------------------------------------------------------------------------------------
def node_fidelity(sums: Dict[str, np.ndarray], tags: Dict[str, str]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    cos_all, snr_all = [], []
    for name, (st, ss, tt, err) in sums.items():
        if tt == 0 and ss == 0:
            continue  # never compared (shape mismatch or no capture)
        cos = float(st) / math.sqrt(max(ss * tt, 1e-300))
        snr = math.inf if err == 0 else 10 * math.log10(max(tt, 1e-300) / err)
        tag = tags.get(name, name)
        out[f"fidelity/cos/{tag}"] = cos
        out[f"fidelity/snr_db/{tag}"] = snr
        cos_all.append(cos)
        snr_all.append(snr)
    if cos_all:
        out["fidelity_cos_min"] = min(cos_all)
        out["fidelity_snr_db_mean"] = float(np.mean(snr_all))
    return out


def coco_fidelity(gts: List[torch.Tensor], dts: List[torch.Tensor], hw, kpt_shape=(), oks_sigmas=None
                  ) -> Dict[str, float]:
    """COCO mAP of detections `dts` against `gts` (both per image, rows x1 y1 x2 y2 conf cls [kpts]), with
    pycocotools. Boxes always; keypoints (OKS) when kpt_shape is given, with `oks_sigmas(nk)` (a family's; default
    the default family's)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    h, w = hw
    nk = kpt_shape[0] if kpt_shape else 0
    images = [{"id": i, "height": h, "width": w} for i in range(len(gts))]
    classes = sorted({int(c) for g in gts for c in g[:, 5].tolist()} | {int(c) for d in dts for c in d[:, 5].tolist()})
    cats = [{"id": c + 1, "name": str(c)} for c in (classes or [0])]

    def rows(dets: List[torch.Tensor], gt: bool, kind: str) -> List[Dict[str, Any]]:
        anns = []
        for img_id, d in enumerate(dets):
            d = d.detach().cpu().double().numpy()
            for r in d:
                x1, y1, x2, y2, conf, cls = r[:6]
                bw, bh = x2 - x1, y2 - y1
                a = {"image_id": img_id, "category_id": int(cls) + 1, "bbox": [x1, y1, bw, bh]}
                if nk:
                    k = r[6:6 + nk * kpt_shape[1]].reshape(nk, -1)
                    kc = k[:, 2] if k.shape[1] > 2 else np.ones(nk)
                    if gt:
                        vis = kc > KPT_VISIBLE
                        kp = np.stack([np.where(vis, k[:, 0], 0), np.where(vis, k[:, 1], 0), vis * 2.0], 1)
                        a["num_keypoints"] = int(vis.sum())
                    else:
                        kp = np.stack([k[:, 0], k[:, 1], kc], 1)
                    a["keypoints"] = kp.reshape(-1).tolist()
                if gt:
                    a.update(id=len(anns) + 1, iscrowd=0, area=bw * bh * (KPT_AREA if kind == "keypoints" else 1.0))
                else:
                    a["score"] = float(conf)
                anns.append(a)
        return anns

    out: Dict[str, float] = {}
    kinds = [("box", "bbox")] + ([("pose", "keypoints")] if nk else [])
    for short, kind in kinds:
        gt_anns = rows(gts, True, kind)
        if kind == "keypoints":
            gt_anns = [a for a in gt_anns if a["num_keypoints"] > 0]
        if not gt_anns:  # the teacher found nothing: fidelity is undefined
            out[f"fidelity_{short}_map50_95"] = out[f"fidelity_{short}_map50"] = float("nan")
            continue
        dt_anns = rows(dts, False, kind)
        if not dt_anns:
            out[f"fidelity_{short}_map50_95"] = out[f"fidelity_{short}_map50"] = 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dt_anns)
            E = COCOeval(coco_gt, coco_dt, kind)
            if kind == "keypoints":
                if oks_sigmas is None:
                    from act.core.family import default_family

                    oks_sigmas = default_family().oks_sigmas
                E.params.kpt_oks_sigmas = oks_sigmas(nk)
            E.evaluate()
            E.accumulate()
            E.summarize()
        out[f"fidelity_{short}_map50_95"] = float(E.stats[0])
        out[f"fidelity_{short}_map50"] = float(E.stats[1])
    return out

