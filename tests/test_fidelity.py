"""Label-free fidelity measures on synthetic detections and features: no data, no teacher."""

import math

import numpy as np
import pytest
import torch

from act.blocks.fidelity import coco_fidelity, node_fidelity

NK = 17


def _dets(n=3, seed=0, conf=0.9):
    """Rows x1 y1 x2 y2 conf cls + 17 x (x y conf), well separated people in a 320 px image."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        x1, y1 = 20.0 + 95 * i, 30.0
        w, h = 60.0, 150.0
        kx = x1 + torch.rand(NK, generator=g) * w
        ky = y1 + torch.rand(NK, generator=g) * h
        kc = torch.full((NK,), 0.9)
        kpts = torch.stack([kx, ky, kc], 1).reshape(-1)
        rows.append(torch.cat([torch.tensor([x1, y1, x1 + w, y1 + h, conf, 0.0]), kpts]))
    return torch.stack(rows)


def test_identical_detections_score_one():
    gts = [_dets(3, 0), _dets(2, 1)]
    r = coco_fidelity(gts, [d.clone() for d in gts], (320, 320), (NK, 3))
    for k in ("fidelity_box_map50_95", "fidelity_box_map50", "fidelity_pose_map50_95", "fidelity_pose_map50"):
        assert r[k] == pytest.approx(1.0), (k, r)


def test_perturbed_and_missing_detections_score_lower():
    gts = [_dets(3, 0), _dets(2, 1)]
    moved = []
    for d in gts:
        d = d.clone()
        d[:, 6::3] += 6.0  # keypoints 6 px off
        d[:, [0, 2]] += 8.0  # boxes shifted
        moved.append(d)
    r = coco_fidelity(gts, moved, (320, 320), (NK, 3))
    assert 0 < r["fidelity_pose_map50_95"] < 0.9
    assert 0 < r["fidelity_box_map50_95"] < 0.95
    half = [gts[0][:1], gts[1]]  # the student misses 2 of the 5 people
    r2 = coco_fidelity(gts, half, (320, 320), (NK, 3))
    assert r2["fidelity_pose_map50"] == pytest.approx(0.6, abs=0.02)


def test_invisible_teacher_keypoints_are_not_ground_truth():
    gt = _dets(1, 0)
    gt[0, 8::3] = 0.1  # every teacher keypoint below the visibility threshold: no pose GT, box GT only
    r = coco_fidelity([gt], [gt.clone()], (320, 320), (NK, 3))
    assert math.isnan(r["fidelity_pose_map50_95"]) and r["fidelity_box_map50_95"] == pytest.approx(1.0)


def test_empty_sides():
    empty = torch.zeros(0, 6 + 3 * NK)
    r = coco_fidelity([empty], [_dets(1)], (320, 320), (NK, 3))
    assert math.isnan(r["fidelity_box_map50_95"])  # the teacher saw nothing: undefined
    r = coco_fidelity([_dets(2)], [empty], (320, 320), (NK, 3))
    assert r["fidelity_box_map50_95"] == 0.0 and r["fidelity_pose_map50_95"] == 0.0
    det = torch.zeros(0, 6)
    assert set(coco_fidelity([det], [det], (64, 64))) == {"fidelity_box_map50_95", "fidelity_box_map50"}


def test_node_fidelity_snr_and_cosine():
    t = np.random.default_rng(0).standard_normal(1000)
    s = t + 0.1 * np.random.default_rng(1).standard_normal(1000)
    sums = {"a": np.array([t @ t, t @ t, t @ t, 0.0]),
            "b": np.array([s @ t, s @ s, t @ t, ((s - t) ** 2).sum()])}
    r = node_fidelity(sums, {"a": "box0", "b": "kpt0"})
    assert r["fidelity/snr_db/box0"] == math.inf and r["fidelity/cos/box0"] == pytest.approx(1.0)
    assert r["fidelity/snr_db/kpt0"] == pytest.approx(20.0, abs=0.5)  # noise at 1/10 of the signal's amplitude
    assert 0.99 < r["fidelity/cos/kpt0"] < 1.0
    assert r["fidelity_cos_min"] == r["fidelity/cos/kpt0"] and r["fidelity_snr_db_mean"] == math.inf
