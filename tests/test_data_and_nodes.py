import shutil

import numpy as np
import pytest
import torch

from act.blocks.data import UnlabeledImages, collate, letterbox, resolve_source
from act.core.errors import DataError


def test_sources(tmp_path, assets_dir):
    imgs = resolve_source("pkg:ultralytics/assets")
    assert {p.name for p in imgs} == {"bus.jpg", "zidane.jpg"}
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in imgs))
    assert resolve_source(str(lst)) == imgs
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not found"):
        resolve_source(str(tmp_path / "missing"))


def test_letterbox_matches_ultralytics(assets_dir):
    import cv2
    from ultralytics.data.augment import LetterBox

    im = cv2.imread(str(assets_dir / "bus.jpg"))
    assert np.array_equal(letterbox(im, 320), LetterBox((320, 320), auto=False)(image=im))


def test_corrupt_images_are_skipped_and_counted(tmp_path, assets_dir):
    shutil.copy(assets_dir / "bus.jpg", tmp_path / "good.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "trunc.jpg").write_bytes((assets_dir / "zidane.jpg").read_bytes()[:200])
    ds = UnlabeledImages(resolve_source(str(tmp_path)), 96)
    images, bad = collate([ds[i] for i in range(len(ds))])
    assert images.shape == (1, 3, 96, 96)
    assert {p.split("/")[-1] for p in bad} == {"zero.jpg", "junk.jpg", "trunc.jpg"}


def test_detect_model_has_six_nodes():
    from act.blocks.distill import find_nodes
    from act.core.family import family_named
    from teachers import resolve_teacher

    src = resolve_teacher("yolov8n.yaml")
    fam = family_named(src.family)
    model = fam.load(src.path, src.kind)
    nodes = find_nodes(model, fam)
    assert len(nodes) == 6 and {n.branch for n in nodes} == {"box", "cls"}
    src = resolve_teacher("yolov8n-pose.yaml")
    assert len(find_nodes(fam.load(src.path, src.kind), fam)) == 9


def test_losses_zero_when_equal_positive_otherwise():
    from act.core.config import DistillConfig
    from act.blocks.distill import DistillLoss, Node

    nodes = [Node("a", "box", 0), Node("b", "cls", 0), Node("c", "kpt", 0)]
    loss = DistillLoss(nodes, DistillConfig())
    t = {"a": torch.randn(2, 64, 4, 4), "b": torch.randn(2, 1, 4, 4), "c": torch.randn(2, 51, 4, 4)}
    total, per = loss(t, t)
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    s = {k: v + 0.3 * torch.randn_like(v) for k, v in t.items()}
    total, per = loss(s, t)
    assert all(float(v) > 0 for v in per.values())


def test_teacher_score_weighting_spends_the_box_and_keypoint_loss_on_detected_objects():
    from act.core.config import DistillConfig
    from act.blocks.distill import DistillLoss, Node

    nodes = [Node("a", "box", 0), Node("b", "cls", 0), Node("c", "kpt", 0)]
    weighted = DistillLoss(nodes, DistillConfig(losses={"box": {"weighting": "teacher_score"},
                                                        "kpt": {"weighting": "teacher_score"}}))
    uniform = DistillLoss(nodes, DistillConfig())
    torch.manual_seed(0)
    cls = torch.full((2, 1, 8, 8), -12.0)  # background everywhere (score 6e-6) ...
    cls[0, 0, 2, 3] = 6.0  # ... but one confident object
    t = {"a": torch.randn(2, 64, 8, 8), "b": cls, "c": torch.randn(2, 51, 8, 8)}
    bg_wrong = {k: v.clone() for k, v in t.items()}
    fg_wrong = {k: v.clone() for k, v in t.items()}
    for k in ("a", "c"):
        bg_wrong[k][1] += 2.0 * torch.randn_like(bg_wrong[k][1])  # the student is off on the object-free image
        fg_wrong[k][0, :, 2, 3] += 2.0 * torch.randn_like(fg_wrong[k][0, :, 2, 3])  # ... or at the object only
    _, per_bg = weighted(bg_wrong, t)
    _, per_fg = weighted(fg_wrong, t)
    _, uni_bg = uniform(bg_wrong, t)
    _, uni_fg = uniform(fg_wrong, t)
    for k in ("a", "c"):
        assert float(per_bg[k]) < 0.01 * float(per_fg[k])  # weighted: background errors barely count
        assert float(uni_bg[k]) > 10 * float(uni_fg[k])  # uniform: the 64x larger background area dominates
    assert float(per_bg["b"]) == float(uni_bg["b"]) == 0.0  # the class loss is the same either way
    with pytest.raises(Exception, match="cls.weighting"):
        DistillConfig(losses={"cls": {"weighting": "teacher_score"}})


def test_feature_loss_compares_a_pruned_students_channels_with_the_teacher_channels_they_were_kept_from():
    from act.core.config import DistillConfig
    from act.blocks.distill import DistillLoss, Node
    from act.core.errors import ActError

    torch.manual_seed(0)
    nodes = [Node("b", "cls", 0), Node("f", "feature", 0)]
    loss = DistillLoss(nodes, DistillConfig(features="auto"))
    teacher = {"b": torch.zeros(2, 1, 4, 4), "f": torch.randn(2, 8, 4, 4)}
    kept = [0, 2, 3, 6, 7]
    student = {"b": teacher["b"], "f": teacher["f"][:, kept].clone()}
    with pytest.raises(ActError, match="f has 5 channels in the student and 8 in the teacher"):
        loss(student, teacher)  # no channel map: which 5 of the 8 is unknown
    loss.set_channel_maps({"f": kept})
    _, per = loss(student, teacher)
    assert float(per["f"]) == pytest.approx(0.0, abs=1e-7)
    loss.set_channel_maps({"f": [0, 1, 2, 3, 4]})  # the wrong teacher channels
    assert float(loss(student, teacher)[1]["f"]) > 0.5
    # relative to the teacher's mean square: a student that outputs zeros scores 1 at any feature scale
    loss.set_channel_maps({"f": kept})
    for scale in (1e-3, 1.0, 1e3):
        t = {"b": teacher["b"], "f": teacher["f"] * scale}
        zero = {"b": teacher["b"], "f": torch.zeros(2, 5, 4, 4)}
        assert float(loss(zero, t)[1]["f"]) == pytest.approx(1.0, rel=0.3)
    with pytest.raises(Exception, match="feature.type: expected 'l2'"):
        DistillConfig(losses={"feature": {"type": "bce"}})


def _solid_images(tmp_path, colours):
    import cv2

    paths = []
    for k, c in enumerate(colours):
        p = tmp_path / f"c{k}.png"
        cv2.imwrite(str(p), np.full((60, 80, 3), c, np.uint8))  # BGR
        paths.append(p)
    return paths


def test_a_mosaic_sample_shows_four_pool_images_and_is_a_function_of_seed_pass_and_index(tmp_path):
    from act.core.config.sections import AugmentConfig

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    paths = _solid_images(tmp_path, colours)
    # no zoom, no shift, no flip: the output is the canvas's middle, where the four quadrants meet near the centre
    aug = AugmentConfig(mosaic=1.0, scale=(1.0, 1.0), translate=0.0, flip=0.0)
    ds = UnlabeledImages(paths, 64, aug, seed=1)
    seen = set()
    for epoch in range(8):
        t, _ = ds[(0, epoch)]
        assert t.shape == (3, 64, 64) and t.dtype == torch.uint8
        assert torch.equal(t, ds[(0, epoch)][0])  # resumable: the same view for the same (seed, pass, index)
        px = {tuple(int(v) for v in t[:, y, x]) for y in range(0, 64, 4) for x in range(0, 64, 4)}
        seen |= px - {(114, 114, 114)}
    rgb = {c[::-1] for c in colours}
    assert seen <= rgb | {(114, 114, 114)} and len(seen) >= 3  # several pool images in the views, nothing else
    assert not torch.equal(ds[(0, 0)][0], ds[(0, 1)][0])  # a new view each pass
    plain = UnlabeledImages(paths, 64, AugmentConfig(scale=(1.0, 1.0), flip=0.0), seed=1)
    t, _ = plain[(0, 0)]
    assert {tuple(int(v) for v in t[:, 32, 32])} == {colours[0][::-1]}  # mosaic 0: the image alone, letterboxed


def test_hsv_jitter_changes_colour_and_only_when_asked(tmp_path):
    from act.core.config.sections import AugmentConfig

    paths = _solid_images(tmp_path, [(40, 120, 200)])
    base = UnlabeledImages(paths, 64, AugmentConfig(scale=(1.0, 1.0), flip=0.0), seed=0)[(0, 0)][0]
    views = [UnlabeledImages(paths, 64, AugmentConfig(scale=(1.0, 1.0), flip=0.0, hsv=(0.015, 0.7, 0.4)),
                             seed=0)[(0, e)][0] for e in range(4)]
    assert all(v.shape == base.shape for v in views)
    centre = [tuple(int(x) for x in v[:, 32, 32]) for v in views]
    assert len(set(centre)) == 4 and tuple(int(x) for x in base[:, 32, 32]) == (200, 120, 40)


@pytest.mark.parametrize("key,value,expect", [("data.augment.hsv", "[0.1,2.0,0.4]", "gains in \\[0, 1\\]"),
                                              ("data.augment.mosaic", "1.5", "less than or equal to 1")])
def test_bad_augmentation_values_fail_with_the_key_path(tmp_path, key, value, expect):
    from act.core.config import load_config
    from act.core.errors import ConfigError
    from conftest import tiny_config

    with pytest.raises(ConfigError, match=f"{key}.*{expect}"):
        load_config(raw=tiny_config(tmp_path), overrides=[f"{key}={value}"])
