import shutil

import numpy as np
import pytest
import torch

from act.data import UnlabeledImages, collate, letterbox, resolve_source
from act.errors import DataError


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
    from act.distill import find_nodes
    from teachers import family_for, resolve_teacher

    fam = family_for(None)
    src = resolve_teacher("yolov8n.yaml")
    model = fam.load(src.path, src.kind)
    nodes = find_nodes(model, fam)
    assert len(nodes) == 6 and {n.branch for n in nodes} == {"box", "cls"}
    src = resolve_teacher("yolov8n-pose.yaml")
    assert len(find_nodes(fam.load(src.path, src.kind), fam)) == 9


def test_losses_zero_when_equal_positive_otherwise():
    from act.config import DistillConfig
    from act.distill import DistillLoss, Node

    nodes = [Node("a", "box", 0), Node("b", "cls", 0), Node("c", "kpt", 0)]
    loss = DistillLoss(nodes, DistillConfig())
    t = {"a": torch.randn(2, 64, 4, 4), "b": torch.randn(2, 1, 4, 4), "c": torch.randn(2, 51, 4, 4)}
    total, per = loss(t, t)
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    s = {k: v + 0.3 * torch.randn_like(v) for k, v in t.items()}
    total, per = loss(s, t)
    assert all(float(v) > 0 for v in per.values())
