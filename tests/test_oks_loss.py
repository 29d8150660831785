"""distill.losses.kpt.type: oks: keypoint distillation in the space COCO scores (OKS), on real tensors."""

import numpy as np
import pytest
import torch

from act.blocks.losses import OKSLossSpec, dfl_distances, oks_keypoint_loss

NK = 17
SIGMAS = torch.tensor(np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89,
                                .89]) / 10.0, dtype=torch.float32)


def box_logits(l, t, r, b, bins=16, h=1, w=1):
    """DFL logits whose expectation is (l, t, r, b) grid units (a sharp two-bin mix)."""
    out = torch.full((1, 4, bins, h, w), -30.0)
    for side, d in enumerate((l, t, r, b)):
        lo = int(np.floor(d))
        frac = d - lo
        out[0, side, lo] = np.log(max(1 - frac, 1e-12))
        if frac > 0:
            out[0, side, lo + 1] = np.log(frac)
    return out.view(1, 4 * bins, h, w)


def kpts(x, y, v, h=1, w=1):
    """(1, NK * 3, h, w) raw keypoint outputs from per-keypoint x, y, visibility-logit arrays."""
    t = torch.stack([torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32),
                     torch.as_tensor(v, dtype=torch.float32)], 1)  # (NK, 3)
    return t.reshape(1, NK * 3, 1, 1).expand(1, NK * 3, h, w).clone()


def test_dfl_distances_decode_the_expectation():
    assert dfl_distances(box_logits(2.5, 3.0, 4.25, 1.0)).flatten().tolist() == pytest.approx([2.5, 3.0, 4.25, 1.0],
                                                                                              abs=1e-4)


def test_zero_when_equal_positive_otherwise_and_gradients_reach_every_channel():
    torch.manual_seed(0)
    t = torch.randn(2, NK * 3, 4, 4)
    box = torch.randn(2, 64, 4, 4)
    assert float(oks_keypoint_loss(t.clone(), t, box, SIGMAS)) == pytest.approx(0.0, abs=1e-6)
    s = (t + 0.3 * torch.randn_like(t)).requires_grad_(True)
    loss = oks_keypoint_loss(s, t, box, SIGMAS)
    assert float(loss) > 0
    loss.backward()
    g = s.grad.view(2, NK, 3, 4, 4).abs().sum(dim=(0, 3, 4))
    assert (g > 0).all()  # x, y and visibility of every keypoint


def test_relative_to_object_size_and_stride_free():
    zero = np.zeros(NK)
    t = kpts(zero, zero, np.full(NK, 20.0))
    s = kpts(np.full(NK, 0.1), zero, np.full(NK, 20.0))  # the same raw offset
    small = oks_keypoint_loss(s, t, box_logits(1, 1, 1, 1), SIGMAS, visibility_weight=0)
    large = oks_keypoint_loss(s, t, box_logits(6, 6, 6, 6), SIGMAS, visibility_weight=0)
    assert float(small) > 3 * float(large) > 0
    # the same pixel error at stride 8 (raw offset 0.1) and stride 32 (0.025) with a box 4x larger in grid units
    # at stride 8 (the same box in pixels): the same loss
    s32 = kpts(np.full(NK, 0.025), zero, np.full(NK, 20.0))
    at8 = oks_keypoint_loss(s, t, box_logits(6, 6, 6, 6), SIGMAS, visibility_weight=0)
    at32 = oks_keypoint_loss(s32, t, box_logits(1.5, 1.5, 1.5, 1.5), SIGMAS, visibility_weight=0)
    assert float(at8) == pytest.approx(float(at32), rel=1e-4)


def test_teacher_visibility_weights_keypoints():
    zero = np.zeros(NK)
    vis = np.full(NK, 20.0)
    vis[0] = -20.0  # the teacher does not see keypoint 0
    t = kpts(zero, zero, vis)
    moved = np.zeros(NK)
    moved[0] = 3.0
    only_hidden = oks_keypoint_loss(kpts(moved, zero, vis), t, box_logits(2, 2, 2, 2), SIGMAS, visibility_weight=0)
    moved_visible = np.zeros(NK)
    moved_visible[1] = 3.0
    visible = oks_keypoint_loss(kpts(moved_visible, zero, vis), t, box_logits(2, 2, 2, 2), SIGMAS,
                                visibility_weight=0)
    assert float(only_hidden) < 1e-6 and float(visible) == pytest.approx(1 / (NK - 1), rel=1e-3)


def test_matches_ultralytics_kpt_iou():
    """1 - (oks term) equals Ultralytics' kpt_iou on the decoded pixel keypoints (all visible)."""
    from ultralytics.utils.metrics import kpt_iou

    rng = np.random.default_rng(0)
    stride, anchor = 16.0, (5.5, 7.5)
    tx, ty = rng.normal(0, 1, NK), rng.normal(0, 1, NK)
    sx, sy = tx + rng.normal(0, 0.2, NK), ty + rng.normal(0, 0.2, NK)
    vis = np.full(NK, 40.0)
    ltrb = (3.2, 4.1, 2.7, 5.3)
    loss = oks_keypoint_loss(kpts(sx, sy, vis), kpts(tx, ty, vis), box_logits(*ltrb), SIGMAS, visibility_weight=0)

    def decode(x, y):
        return torch.tensor(np.stack([(2 * x + anchor[0] - 0.5) * stride, (2 * y + anchor[1] - 0.5) * stride,
                                      np.ones(NK)], 1), dtype=torch.float32)

    area = torch.tensor([(ltrb[0] + ltrb[2]) * (ltrb[1] + ltrb[3]) * stride ** 2 * 0.53])
    oks = kpt_iou(decode(tx, ty)[None], decode(sx, sy)[None], area, SIGMAS.tolist())
    assert 1 - float(oks) == pytest.approx(float(loss), abs=1e-5)


def test_config_accepts_oks_on_kpt_and_refuses_it_elsewhere_before_training(tmp_path):
    from act import AutoCompression
    from act.core.errors import ConfigError
    from conftest import tiny_config

    assert OKSLossSpec(type="oks", weighting="teacher_score").visibility_weight == 1.0
    bad = tiny_config(tmp_path / "bad", distill={"losses": {"box": {"type": "oks"}}}, export={"onnx": False})
    with pytest.raises(ConfigError, match="distill.losses.box.type: oks"):
        AutoCompression(bad).run()
    assert not (tmp_path / "bad" / "last.pt").exists()
    cfg = tiny_config(tmp_path / "ok", distill={"losses": {"kpt": {"type": "oks", "weighting": "teacher_score"}}},
                      train={"iterations": 3}, export={"onnx": False}, report={"enabled": False})
    ac = AutoCompression(cfg)
    ac.run()
    assert len(ac.loss_history) == 3 and all(np.isfinite(ac.loss_history))
