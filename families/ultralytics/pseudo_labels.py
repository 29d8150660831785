"""Teacher pseudo-labels through Ultralytics' own training loss: the teacher's NMS'd detections on each batch (boxes,
class, keypoints with visibility = the teacher's keypoint confidence above `kpt_conf`) become the targets of
`v8DetectionLoss` / `v8PoseLoss` (task-aligned assigner, CIoU + DFL, BCE, OKS keypoint loss, with Ultralytics'
default gains), scored on the student's head-branch outputs. Still no human labels: the teacher labels the same
(augmented) view the student sees.

Both sides are read from the distillation nodes (the last conv of every head branch, per pyramid level), which are
exactly what the head's training-mode forward returns before its decode, so no second forward is needed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List

import torch
from torch import nn

from act.core.errors import ConfigError


class PseudoLabelLoss:
    """`loss(student_out, teacher_out)` -> Ultralytics' training loss of the student against the teacher's
    detections (the sum of its weighted terms, per image)."""

    def __init__(self, head: nn.Module, task: str, nodes, conf: float, iou: float, kpt_conf: float):
        self.levels: Dict[int, Dict[str, str]] = {}
        for n in nodes:
            if n.branch in ("box", "cls", "kpt") and n.level >= 0:
                self.levels.setdefault(n.level, {})[n.branch] = n.name
        need = ("box", "cls", "kpt") if task == "pose" else ("box", "cls")
        if not self.levels or any(b not in by for by in self.levels.values() for b in need):
            raise ConfigError("invalid config:\n  distill.pseudo_labels: needs the head's box / cls"
                              f"{' / kpt' if task == 'pose' else ''} nodes at every level (distill.nodes: auto)")
        self.head, self.task = head, task
        self.conf, self.iou, self.kpt_conf = conf, iou, kpt_conf
        self.criterion = None  # made on the first call, on the outputs' device

    def _criterion(self, device: torch.device):
        if self.criterion is None or self.criterion.device != device:
            from ultralytics.cfg import get_cfg
            from ultralytics.utils.loss import v8DetectionLoss, v8PoseLoss

            h = self.head
            head = SimpleNamespace(stride=h.stride.to(device), nc=h.nc, reg_max=h.reg_max,
                                   kpt_shape=getattr(h, "kpt_shape", None))
            host = SimpleNamespace(args=get_cfg(), model=[head], parameters=lambda: iter([torch.empty(0, device=device)]))
            self.criterion = (v8PoseLoss if self.task == "pose" else v8DetectionLoss)(host)
        return self.criterion

    def predictions(self, out: Dict[str, torch.Tensor]) -> Dict[str, object]:
        """Node outputs -> the dict Ultralytics' losses read (its head's training-mode output)."""
        levels = [self.levels[k] for k in sorted(self.levels)]
        flat = {b: torch.cat([out[by[b]].float().flatten(2) for by in levels], 2) for b in levels[0]}
        p = {"feats": [out[by["box"]].float() for by in levels], "boxes": flat["box"], "scores": flat["cls"]}
        if "kpt" in flat:
            p["kpts"] = flat["kpt"]
        return p

    @torch.no_grad()
    def targets(self, pred: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """The teacher's detections after NMS, as an Ultralytics training batch (boxes xywh and keypoints in
        0-1 image units)."""
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.ops import xyxy2xywh
        from ultralytics.utils.tal import make_anchors

        c = self.criterion
        feats = pred["feats"]
        anchors, strides = make_anchors(feats, c.stride, 0.5)
        b = feats[0].shape[0]
        h, w = feats[0].shape[2] * float(c.stride[0]), feats[0].shape[3] * float(c.stride[0])
        xywh = xyxy2xywh(c.bbox_decode(anchors, pred["boxes"].permute(0, 2, 1)) * strides)  # pixels (b, a, 4)
        parts = [xywh, pred["scores"].permute(0, 2, 1).sigmoid()]
        nk = 0
        if self.task == "pose":
            nk, ndim = c.kpt_shape
            k = c.kpts_decode(anchors, pred["kpts"].permute(0, 2, 1).reshape(b, -1, nk, ndim))
            k[..., :2] *= strides[:, None]
            if ndim == 3:
                k[..., 2] = k[..., 2].sigmoid()
            parts.append(k.flatten(2))
        dets: List[torch.Tensor] = non_max_suppression(torch.cat(parts, -1).permute(0, 2, 1), self.conf, self.iou,
                                                       nc=c.nc)
        idx = torch.cat([torch.full((len(d),), i, device=xywh.device) for i, d in enumerate(dets)]).float()
        d = torch.cat(dets, 0)
        batch = {"batch_idx": idx, "cls": d[:, 5:6], "bboxes": xyxy2xywh(d[:, :4]) / d.new_tensor([w, h, w, h])}
        if nk:
            k = d[:, 6:].reshape(len(d), nk, -1).clone()
            k[..., 0] /= w
            k[..., 1] /= h
            if k.shape[-1] == 3:
                k[..., 2] = (k[..., 2] > self.kpt_conf).float()
            batch["keypoints"] = k
        return batch

    def __call__(self, student_out: Dict[str, torch.Tensor], teacher_out: Dict[str, torch.Tensor]) -> torch.Tensor:
        any_node = next(iter(self.levels.values()))["box"]
        self._criterion(student_out[any_node].device)
        batch = self.targets(self.predictions(teacher_out))
        s = self.predictions(student_out)
        loss, _ = self.criterion.loss(s, batch)  # the weighted terms, each times the batch size
        return loss.sum() / s["boxes"].shape[0]
