"""The run report (report.md + report.html + PNGs + TensorBoard figures) of `auto` runs that stopped after PTQ and
after QAT, and `act report RUN_DIR`."""

import importlib.util

import numpy as np
import pytest
from PIL import Image


def _check_png(path):
    im = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    assert im.shape[0] > 150 and im.shape[1] > 300, (path, im.shape)
    assert im.std() > 5, path  # not a blank canvas


@pytest.mark.parametrize("which, expected", [("loose", {"before_after", "ptq_probe", "sensitivity"}),
                                             ("tight", {"before_after", "ptq_probe", "curves"})])
def test_report_renders(auto_runs, which, expected):
    s, out = auto_runs[which], auto_runs["base"] / which
    rep = s["report"]
    assert "error" not in rep, rep
    assert expected <= set(rep["images"]), rep["images"]
    for p in rep["images"].values():
        _check_png(p)
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "## Before / after" in md and "## Decisions" in md and "ORT CPU ms" in md
    assert html.count("data:image/png;base64,") == len(rep["images"])
    teacher, student = rep["rows"][0], rep["rows"][-1]
    assert teacher["gmacs"] > 0 and student["gmacs"] == pytest.approx(teacher["gmacs"], rel=1e-3)
    assert student["weights_mb"] < 0.5 * teacher["weights_mb"]  # INT8 weights
    assert teacher["latency_ms"] > 0 and student["latency_ms"] > 0
    if importlib.util.find_spec("openvino") is not None:  # OpenVINO CPU latency beside onnxruntime's
        assert teacher["openvino_ms"] > 0 and student["openvino_ms"] > 0 and "OpenVINO CPU ms" in md
    assert 0 < student["fidelity_pose_map50_95"] <= 1 and teacher["fidelity_pose_map50_95"] == 1.0


def test_report_figures_in_tensorboard(auto_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(auto_runs["base"] / "tight" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {"report/before_after", "report/curves", "report/ptq_probe"} <= tags, tags


def test_curves_come_from_the_run_history(auto_runs):
    from act.run.report import load_history

    h = load_history(auto_runs["base"] / "tight" / "tensorboard" / "history.jsonl")
    assert [r["step"] for r in h["train"]] == [1, 2]  # log_every 1, stopped early at 2
    assert [r["step"] for r in h["eval"]] == [2]
    assert all(np.isfinite(r["values"]["loss"]) for r in h["train"])


def test_act_report_rewrites_a_finished_run(auto_runs, tmp_path):
    import shutil

    from act.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(auto_runs["base"] / "loose", run, ignore=shutil.ignore_patterns("report*"))
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    _check_png(run / "report" / "before_after.png")
    assert main(["report", str(tmp_path / "nothing")]) != 0
