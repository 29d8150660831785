"""What `act compress` does by itself before distilling (quant.calibrator: search, the shipped recipes' flow), on
YOLOv8 and YOLO11; and the weight EMA (train.ema): what is evaluated, kept, exported and resumed."""

import pytest
import torch
import yaml

from act import AutoCompression
from act.blocks.checkpoint import load_checkpoint
from act.blocks.quant.histograms import get_ranges
from act.run.trainer import Trainer
from conftest import REPO, interrupt_at_step, tiny_config

CANDIDATES = [{"calibrator": "percentile", "percentile": 99.99}, {"calibrator": "minmax"}, {"calibrator": "mse"}]


def test_shipped_recipes_calibrate_by_search():
    for name in ("yolo11n_pose_qat_mini", "yolov8_pose_qat", "yolo11n_pose_prune_qat", "demo_pose_qat"):
        raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert raw["quant"].get("calibrator", "search") == "search", name


def test_shipped_qat_recipes_export_a_weight_average():
    """The measured best flow (README benchmark): distillation at lr 3e-5 with a weight EMA of the student, which is
    what gets evaluated, kept and exported."""
    for name in ("yolo11n_pose_qat_mini", "yolov8_pose_qat", "demo_pose_qat"):
        train = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["train"]
        assert float(train["ema"]) == 0.999 and float(train["lr"]) == 3e-5, name


@pytest.mark.parametrize("teacher", ["yolov8n-pose.yaml", "yolo11n-pose"])
def test_search_starts_from_the_best_calibrator_and_exports(tmp_path, teacher):
    """The recipe flow: PTQ candidates tried on the pool, the best by label-free fidelity kept, then QAT; the
    student exports with parity (YOLOv8 from its architecture yaml, random weights: the flow, not accuracy)."""
    cfg = tiny_config(tmp_path, model={"teacher": teacher}, data={"imgsz": 96},
                      train={"iterations": 2, "checkpoint_every": 2},
                      quant={"calibrator": "search"}, auto={"search": CANDIDATES},
                      ptq={"num_images": 2, "batch_size": 2, "bins": 512},
                      eval={"every": 2, "metric": "fidelity_box_map50_95",
                            "fidelity": {"source": "pkg:ultralytics/assets", "images": 2, "teacher_conf": 0.01}})
    ac = AutoCompression(cfg)
    seen = {}
    real = Trainer.calibrate

    def calibrate(self, batches):
        real(self, batches)
        seen["ranges"] = get_ranges(self.student)

    Trainer.calibrate = calibrate
    try:
        summary = ac.run()
    finally:
        Trainer.calibrate = real
    init = summary["quant_init"]
    assert set(init["candidates"]) == {"percentile 99.99", "minmax", "mse"} and init["images"] == 2
    # the kept candidate is one of the best by the run's fidelity metric (ties go to the head SNR, which the summary
    # does not list: with 2 images and random weights candidates often tie)
    assert init["candidates"][init["calibrator"]] == max(init["candidates"].values())
    assert init["metric"] == "fidelity_box_map50_95"
    assert seen["ranges"] and all(v > 0 for v in seen["ranges"].values())
    assert summary["onnx"]["parity"]["passed"] and summary["onnx"]["lint"]["clean"]


def test_ranges_match_the_chosen_ptq_calibrator(tmp_path):
    """`quant.calibrator: percentile` starts from exactly the ranges `act ptq` computes with that calibrator."""
    from act.run.ptq import PostTrainingQuantization

    common = dict(data={"imgsz": 96}, ptq={"num_images": 2, "batch_size": 2, "bins": 512},
                  eval={"fidelity": {"enabled": False}}, export={"onnx": False}, report={"enabled": False})
    ptq = PostTrainingQuantization(tiny_config(tmp_path / "ptq", **common))
    ptq.run()
    ptq_ranges = get_ranges(load_checkpoint(tmp_path / "ptq" / "ptq.pt")["model"])
    tr = Trainer(tiny_config(tmp_path / "qat", quant={"calibrator": "percentile"}, **common))
    tr.setup()
    tr.calibrate(iter(()))
    assert tr.quant_init["calibrator"] == "percentile"
    assert get_ranges(tr.student) == pytest.approx(ptq_ranges)


def test_weight_ema_is_what_is_kept_and_it_resumes(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"iterations": 6, "ema": 0.9, "ema_tau": 2.0},
                      eval={"fidelity": {"enabled": False}}, export={"onnx": False}, report={"enabled": False})
    whole = AutoCompression(cfg)
    whole.run()
    ema, raw = whole.trainer.ema, whole.trainer.student
    assert ema.updates == 6
    best = load_checkpoint(tmp_path / "best.pt")["model"].state_dict()
    last = load_checkpoint(tmp_path / "last.pt")
    # best.pt (no eval.metric: the last state) holds the average, last.pt the raw student plus the average's state
    for k, v in ema.module.state_dict().items():
        assert torch.equal(best[k], v.cpu()), k
    assert any(not torch.equal(best[k], v.cpu()) for k, v in raw.state_dict().items() if v.dtype.is_floating_point)
    assert last["act"]["ema"]["updates"] == 6

    # interrupted after 3 steps and resumed: the average goes on from the one last.pt saved, not from the student
    cfg2 = tiny_config(tmp_path / "b", train={"iterations": 6, "ema": 0.9, "ema_tau": 2.0},
                       eval={"fidelity": {"enabled": False}}, export={"onnx": False}, report={"enabled": False})
    real_step = interrupt_at_step(monkeypatch, 4)
    with pytest.raises(Exception, match="--resume"):
        AutoCompression(cfg2).run()
    saved = load_checkpoint(tmp_path / "b" / "last.pt")["act"]["ema"]
    assert saved["updates"] == 3
    at_resume = {}

    def first_step_sees(self, images):
        if not at_resume:
            at_resume.update(updates=self.ema.updates, model={k: v.clone() for k, v in
                                                              self.ema.module.state_dict().items()})
        return real_step(self, images)

    monkeypatch.setattr(Trainer, "train_step", first_step_sees)
    resumed = AutoCompression(cfg2)
    resumed.run(resume=True)
    assert at_resume["updates"] == 3 and resumed.trainer.ema.updates == 6
    for k, v in saved["model"].items():
        assert torch.equal(at_resume["model"][k].cpu(), v), k
