"""distill.pseudo_labels: the teacher's NMS'd detections as targets of Ultralytics' own training loss (v8PoseLoss)."""

import cv2
import pytest
import torch

from act.core.config.distill import PseudoLabelConfig
from act.blocks.distill import FeatureCapture, find_nodes
from act.core.errors import ConfigError
from act.run.step_graph import unavailable_reason
from families.ultralytics.yolo import UltralyticsYOLO


@pytest.fixture(scope="module")
def teacher_batch(teacher_path, assets_dir):
    """The real yolo11n-pose teacher, its head-branch node outputs and its own decoded output on the packaged images
    at 320 px."""
    fam = UltralyticsYOLO()
    model = fam.load(teacher_path).float().eval()
    nodes = find_nodes(model, fam)
    images = [fam.letterbox(cv2.imread(str(p)), 320)[:, :, ::-1].copy() for p in sorted(assets_dir.glob("*.jpg"))]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    cap = FeatureCapture(model, [n.name for n in nodes])
    with torch.no_grad():
        decoded = fam.decoded(model(x))
    out = cap.pop()
    cap.remove()
    return fam, model, nodes, out, decoded


def test_targets_are_the_teachers_own_detections(teacher_batch):
    """Decoded from the node outputs, the targets are what the teacher's own decode + NMS finds: the same persons,
    boxes and keypoints (in 0-1 image units), keypoints labelled where the teacher is confident."""
    fam, model, nodes, out, decoded = teacher_batch
    cfg = PseudoLabelConfig(enabled=True)
    loss = fam.pseudo_label_loss(model, nodes, cfg)
    loss._criterion(torch.device("cpu"))
    batch = loss.targets(loss.predictions(out))
    ref = fam.nms(decoded, cfg.conf, cfg.iou, nc=1)
    assert [int((batch["batch_idx"] == i).sum()) for i in range(len(ref))] == [len(r) for r in ref]
    assert sum(len(r) for r in ref) >= 3  # (bus.jpg and zidane.jpg hold people)
    r = torch.cat(ref)
    xyxy = r[:, :4] / 320
    want = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    torch.testing.assert_close(batch["bboxes"], want, atol=1e-4, rtol=1e-4)
    kpt = r[:, 6:].reshape(len(r), 17, 3)
    torch.testing.assert_close(batch["keypoints"][..., :2], kpt[..., :2] / 320, atol=1e-4, rtol=1e-4)
    assert torch.equal(batch["keypoints"][..., 2], (kpt[..., 2] > cfg.kpt_conf).float())
    assert 0 < batch["keypoints"][..., 2].mean() < 1


def test_loss_is_least_at_the_teacher_and_reaches_each_branch(teacher_batch):
    fam, model, nodes, out, _ = teacher_batch
    loss = fam.pseudo_label_loss(model, nodes, PseudoLabelConfig(enabled=True))
    student = {k: v.clone().requires_grad_(True) for k, v in out.items()}
    at_teacher = loss(student, out)
    at_teacher.backward()
    grads = {n.branch + str(n.level): float(student[n.name].grad.abs().sum()) for n in nodes}
    assert all(grads[f"cls{lvl}"] > 0 for lvl in range(3)), grads  # the class branch learns the background too
    assert all(any(grads[f"{b}{lvl}"] > 0 for lvl in range(3)) for b in ("box", "kpt")), grads  # where assigned
    torch.manual_seed(0)
    noisy = {k: v + 0.5 * torch.randn_like(v) for k, v in out.items()}
    assert float(loss(noisy, out)) > 2 * float(at_teacher.detach()) > 0


def test_needs_the_head_nodes_and_keeps_the_step_eager(teacher_batch):
    fam, model, nodes, _, _ = teacher_batch
    with pytest.raises(ConfigError, match="distill.pseudo_labels: needs the head's box / cls / kpt nodes"):
        fam.pseudo_label_loss(model, [n for n in nodes if n.branch != "kpt"], PseudoLabelConfig(enabled=True))
    why = "distill.pseudo_labels: the teacher's NMS has data-dependent shapes"
    assert unavailable_reason(torch.device("cuda"), False, False, "none", host_sync=why) == why


def test_a_run_with_pseudo_labels_trains_and_logs_the_term(tmp_path):
    from act import AutoCompression
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, distill={"pseudo_labels": {"enabled": True, "weight": 0.5}}, train={"iterations": 3},
                      export={"onnx": False}, report={"enabled": False})
    ac = AutoCompression(cfg)
    summary = ac.run()
    assert summary["iterations"] == 3
    assert ac.trainer.loss_fn.pseudo_labels is not None
    logged = (tmp_path / "tensorboard").rglob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in logged:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert any(t.endswith("pseudo_labels") for t in tags), sorted(tags)


@pytest.mark.parametrize("key,value,expected", [("weight", 0, "greater than 0"), ("conf", 1.5, "less than 1"),
                                                ("kpt_cof", 0.5, "unknown key")])
def test_bad_settings_fail_with_the_key_path(tmp_path, key, value, expected):
    from act.core.config import validate_config
    from conftest import tiny_config

    with pytest.raises(ConfigError, match=rf"distill.pseudo_labels.{key}.*{expected}|{expected}.*distill.pseudo"):
        validate_config(tiny_config(tmp_path, distill={"pseudo_labels": {key: value}}))
