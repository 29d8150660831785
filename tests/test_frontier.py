"""The accuracy-latency frontier (`act frontier`) and `strategy: auto` with a budget, on the real yolo11n-pose teacher
at small input sizes on CPU (the coco-pose-mini images: a labeled val split for mAP, the pool for fidelity)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]
DATA_YAML = ROOT / "data" / "coco-pose-mini.yaml"
SHARED = (ROOT / "data" / "../../shared/data/coco-pose-mini").resolve()
needs_data = pytest.mark.skipif(not (SHARED / "images" / "val").is_dir(), reason="needs ../shared/data/coco-pose-mini")


def _cfg(out, **sections):
    raw = {
        "model": {"teacher": "yolo11n-pose"},
        "data": {"train": str(DATA_YAML), "imgsz": 160, "batch_size": 4, "workers": 0},
        "train": {"iterations": 3, "lr": 1e-4, "log_every": 1, "checkpoint_every": 2, "device": "cpu"},
        "quant": {"calibrator": "ema", "calib_batches": 2},
        "ptq": {"num_images": 8, "batch_size": 4, "bins": 512},
        "eval": {"before": False, "data": str(DATA_YAML), "max_images": 16, "batch_size": 8, "every": 100,
                 "fidelity": {"images": 16}},
        "export": {"parity_images": 2},
        "report": {"enabled": False},
        "strategy": "qat",
        "frontier": {"imgsz": [160, 128], "int8": ["ptq"], "latency_runs": 3},
        "output_dir": str(out),
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return raw


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    """One frontier (FP32 and PTQ INT8 at 160 and 128 px), made through the CLI as a user runs it."""
    tmp = tmp_path_factory.mktemp("frontier")
    cfg = tmp / "frontier.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp / "run")))
    r = subprocess.run([sys.executable, "-m", "act", "frontier", "--config", str(cfg)], env=cli_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp / "run" / "frontier"
    return cfg, out, json.loads((out / "frontier.json").read_text())


@needs_data
@pytest.mark.slow
def test_frontier_measures_every_point(frontier_run):
    _, out, res = frontier_run
    rows = {r["name"]: r for r in res["points"]}
    assert list(rows) == ["160px_fp32", "128px_fp32", "160px_int8-ptq", "128px_int8-ptq"]
    assert res["metric"] == "pose_map50_95"
    ref = rows["160px_fp32"]
    assert ref["drop"] == 0 and ref["macs_ratio"] == pytest.approx(1.0)
    # MACs follow the input size squared
    assert rows["128px_fp32"]["macs_ratio"] == pytest.approx((128 / 160) ** 2, rel=0.03)
    for r in rows.values():
        assert r["latency"]["onnxruntime"]["median_ms"] > 0
        assert r["latency"]["onnxruntime"]["imgsz"] == [r["imgsz"], r["imgsz"]]  # each ONNX runs at its own size
        assert 0 <= r["metrics"]["pose_map50_95"] <= 1
        assert r["command"] and Path(r["onnx"]).is_file()
    # label-free fidelity against the teacher at 160 px: the teacher's own export scores ~1, a smaller input less
    assert ref["metrics"]["fidelity_pose_map50_95"] > 0.95
    assert rows["128px_fp32"]["metrics"]["fidelity_pose_map50_95"] < ref["metrics"]["fidelity_pose_map50_95"]
    assert rows["160px_int8-ptq"]["command"].startswith("act ptq --config")
    assert "data.imgsz=128" in rows["128px_int8-ptq"]["command"]
    # the INT8 ONNX carries its input size for Ultralytics
    import onnx

    meta = {p.key: p.value for p in onnx.load(rows["128px_int8-ptq"]["onnx"]).metadata_props}
    assert "128" in meta["imgsz"]
    for f in ("frontier.md", "frontier.png", "frontier.json"):
        assert (out / f).stat().st_size > 0
    md = (out / "frontier.md").read_text()
    assert "| 128px_int8-ptq |" in md and "How each point is made" in md


@needs_data
@pytest.mark.slow
def test_frontier_pareto_marks_are_consistent(frontier_run):
    from act.orchestrate.pareto import dominated_by

    _, _, res = frontier_run
    rows = res["points"]
    assert any(r["pareto"] for r in rows)
    for r in rows:
        other = dominated_by(r, rows)
        assert r["pareto"] == (other is None)
        if not r["pareto"]:
            assert r["dominated_by"] == other["name"]
    assert rows[0]["pareto"]  # the most accurate point is never dominated


@needs_data
@pytest.mark.slow
def test_frontier_resumes_without_measuring_again(frontier_run):
    cfg, out, res = frontier_run
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("points/*/point.json")}
    assert len(stamps) == 4
    r = subprocess.run([sys.executable, "-m", "act", "frontier", "--config", str(cfg), "--only", "128px_int8-ptq"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/point.json")} == stamps
    again = json.loads((out / "frontier.json").read_text())
    assert [p["name"] for p in again["points"]] == ["160px_fp32", "128px_int8-ptq"]
    # --remeasure latency: times the point again, keeps its accuracy
    point = out / "points" / "128px_int8-ptq" / "point.json"
    before = json.loads(point.read_text())
    r = subprocess.run([sys.executable, "-m", "act", "frontier", "--config", str(cfg), "--only", "128px_int8-ptq",
                        "--remeasure", "latency"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = json.loads(point.read_text())
    assert after["metrics"] == before["metrics"] and after["latency"] != before["latency"]
    bad = subprocess.run([sys.executable, "-m", "act", "frontier", "--config", str(cfg), "--only", "100px_fp32"],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no point named ['100px_fp32']" in bad.stderr


@needs_data
@pytest.mark.slow
def test_budget_delivers_the_most_accurate_point_within_it(frontier_run, tmp_path):
    """strategy auto with auto.macs_ratio reuses the measured frontier, leaves out the points that aim above it and
    delivers the best one within it as student.onnx."""
    _, out, res = frontier_run
    rows = {r["name"]: r for r in res["points"]}
    raw = _cfg(tmp_path / "budget", strategy="auto", auto={"macs_ratio": 0.7},
               frontier={"output_dir": str(out)})
    from act.orchestrate.compress import AutoCompression

    summary = AutoCompression(raw).run()
    within = [r for r in res["points"] if r["macs_ratio"] <= 0.7]
    best = max(within, key=lambda r: r["accuracy"])
    assert summary["met"] and summary["chosen"]["name"] == best["name"]
    delivered = tmp_path / "budget" / "student.onnx"
    assert delivered.read_bytes() == Path(rows[best["name"]]["onnx"]).read_bytes()
    decisions = "\n".join(summary["decisions"])
    assert f"chosen: {best['name']}" in decisions
    assert "not made: 160px_int8-ptq: aims at 1.00x MACs > budget 0.7x" in decisions
    assert "160px_fp32" in decisions and "outside the budget" in decisions
    report = tmp_path / "budget" / "report.md"
    assert report.read_text().count(best["name"]) >= 2 and "](frontier.png)" in report.read_text()
    assert (tmp_path / "budget" / "frontier.png").is_file()
    report.unlink()
    from act.cli.main import main

    assert main(["report", str(tmp_path / "budget")]) == 0  # `act report` rewrites it from the summary
    assert f"Chosen: **{best['name']}**" in report.read_text()


@needs_data
@pytest.mark.slow
def test_budget_nothing_meets_fails_with_the_closest_points(frontier_run, tmp_path):
    _, out, res = frontier_run
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path / "budget", strategy="auto", auto={"macs_ratio": 0.7,
                                                                                    "max_drop": 0.0001},
                                       frontier={"output_dir": str(out)})))
    r = subprocess.run([sys.executable, "-m", "act", "compress", "--config", str(cfg)], env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 6, r.stderr[-2000:]
    assert "no point of the frontier meets MACs <= 0.7x the teacher's, accuracy drop <= 0.0001" in r.stderr
    # the closest either way: the best within the budget (too lossy) and the cheapest accurate enough (too big)
    assert "within the budget, but loses too much" in r.stderr and "160px_fp32" in r.stderr
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert summary["met"] is False and "160px_fp32" in summary["closest"]
    assert not (tmp_path / "budget" / "student.onnx").exists()


@needs_data
@pytest.mark.slow
def test_latency_budget_screens_qat_points_by_their_ptq_twin(frontier_run, tmp_path):
    """A QAT point is not trained when its PTQ twin (the same graph) is already over the latency budget."""
    _, out, res = frontier_run
    rows = {r["name"]: r for r in res["points"]}
    rt = res["runtime"]
    slow = rows["160px_int8-ptq"]["latency"][rt]["median_ms"]
    raw = _cfg(tmp_path / "budget", strategy="auto", auto={"latency_ms": slow * 0.5},
               frontier={"output_dir": str(out), "int8": ["qat"], "imgsz": [160]})
    from act.orchestrate.budget import BudgetUnmet
    from act.orchestrate.compress import AutoCompression

    with pytest.raises(BudgetUnmet):  # nothing at 160 px runs in half the PTQ point's time
        AutoCompression(raw).run()
    decisions = json.loads((tmp_path / "budget" / "decisions.json").read_text())
    assert any(d.startswith("not made: 160px_int8-qat: its PTQ twin 160px_int8-ptq") for d in decisions)
    assert not (out / "points" / "160px_int8-qat").exists()


@needs_data
@pytest.mark.slow
def test_pruned_point_and_its_fp32_stage(tmp_path):
    """A pruned INT8 point runs the staged prune -> quant recipe at its input size; its FP32 point is that run's
    prune stage (made once)."""
    from act.orchestrate.frontier import Frontier

    raw = _cfg(tmp_path / "run", frontier={"points": [{"imgsz": 128, "prune": 0.8, "precision": "int8"},
                                                      {"imgsz": 128, "prune": 0.8, "precision": "fp32"}],
                                           "prune_stages": [{"type": "prune", "steps": 1}, {"type": "quant"}],
                                           "latency_runs": 2},
               eval={"data": None})
    res = Frontier(raw).run()
    rows = {r["name"]: r for r in res["points"]}
    assert sorted(rows) == ["128px_prune0.8_fp32", "128px_prune0.8_int8-qat", "160px_fp32"]
    assert res["metric"] == "fidelity_pose_map50_95"  # no labels: label-free fidelity ranks
    q, f = rows["128px_prune0.8_int8-qat"], rows["128px_prune0.8_fp32"]
    assert f["run_dir"].endswith("stages/1_prune") and Path(f["run_dir"]).parent.parent == Path(q["run_dir"])
    assert not (tmp_path / "run" / "frontier" / "points" / "128px_prune0.8_fp32" / "stages").exists()
    # pruned to about 0.8x of the teacher's MACs at 128 px: 0.8 x (128/160)^2 of the reference's
    assert q["macs_ratio"] == pytest.approx(0.8 * 0.64, abs=0.06) and q["macs_ratio"] == f["macs_ratio"]
    assert q["params_ratio"] < 0.95
    assert "stages=" in q["command"] and '"target": 0.8' in q["command"] and "data.imgsz=128" in q["command"]


def test_cross_size_fidelity_scales_detections_to_the_teacher(tmp_path):
    """The teacher scored against itself at a smaller input: near 1 with the coordinates scaled to the teacher's
    letterbox, near 0 without (the boxes would sit in the wrong place)."""
    from act.blocks.fidelity import FidelityEvaluator, scale_detections
    from act.run.build import load_frozen

    teacher, family, _ = load_frozen("yolo11n-pose")
    from act.blocks.data import _pkg_folder

    paths = sorted(Path(_pkg_folder("pkg:ultralytics/assets")).glob("*.jpg"))
    ev = FidelityEvaluator.from_paths(teacher, paths, 320, "pose", family=family, student_imgsz=288, batch_size=2)
    same = FidelityEvaluator.from_paths(teacher, paths, 320, "pose", family=family, batch_size=2)
    res = ev(_copy(teacher))
    assert res["fidelity_box_map50_95"] > 0.7 and res["fidelity_pose_map50_95"] > 0.6
    assert same(_copy(teacher))["fidelity_box_map50_95"] > 0.95

    d = torch.tensor([[10.0, 20.0, 30.0, 40.0, 0.9, 0.0] + [5.0, 6.0, 0.8] * 17])
    s = scale_detections(d, 2.0, (17, 3))
    assert s[0, :4].tolist() == [20.0, 40.0, 60.0, 80.0] and s[0, 4:6].tolist() == d[0, 4:6].tolist()
    assert s[0, 6:9].tolist() == pytest.approx([10.0, 12.0, 0.8])
    assert scale_detections(torch.zeros(0, 57), 2.0, (17, 3)).shape == (0, 57)

    # without the scaling, the same detections miss
    import act.blocks.fidelity as F

    real = F.scale_detections
    try:
        F.scale_detections = lambda d, scale, kpt_shape=(): d
        wrong = ev(_copy(teacher))
    finally:
        F.scale_detections = real
    assert wrong["fidelity_box_map50_95"] < res["fidelity_box_map50_95"] - 0.2


def _copy(m):
    import copy

    return copy.deepcopy(m)


def test_choose_never_picks_a_dominated_point_and_explains():
    from act.orchestrate.pareto import Budget, choose, mark_pareto

    def pt(name, acc, ms, macs):
        return {"name": name, "accuracy": acc, "drop": 0.5 - acc, "cost": ms, "latency_ms": ms, "macs_ratio": macs}

    pts = mark_pareto([pt("teacher", 0.50, 40.0, 1.0), pt("576_int8", 0.49, 15.0, 0.81),
                       pt("prune0.8_int8", 0.44, 16.0, 0.8), pt("512_int8", 0.47, 13.0, 0.64),
                       pt("512_int8_same_acc_slower", 0.47, 14.0, 0.64)])
    assert [p["name"] for p in pts if p["pareto"]] == ["teacher", "576_int8", "512_int8"]
    c = choose(pts, Budget(latency_ms=16.0), "m")
    assert c.met and c.chosen["name"] == "576_int8"
    assert any(r.startswith("not chosen: prune0.8_int8") and "dominated by 576_int8" in r for r in c.reasons)
    assert any(r.startswith("not chosen: teacher") and "40.0 ms > 16 ms" in r for r in c.reasons)
    # a tie in accuracy goes to the faster point
    assert choose(pts, Budget(latency_ms=14.5), "m").chosen["name"] == "512_int8"
    # max_drop: the best within the budget loses too much -> unmet, with the closest either way
    c = choose(pts, Budget(latency_ms=14.5, max_drop=0.02), "m")
    assert not c.met and c.chosen is None
    assert [p["name"] for p in c.closest] == ["512_int8", "576_int8"]


def test_frontier_config_is_validated():
    from act.core.config import load_config
    from act.core.errors import ConfigError

    base = {"model": {"teacher": "yolo11n-pose"}, "data": {"train": "pkg:ultralytics/assets"}}

    def err(**over):
        with pytest.raises(ConfigError) as e:
            load_config(raw={**base, **over})
        return str(e.value)

    assert "frontier.imgsz: Value error, expected a multiple of 32" in err(frontier={"imgsz": [600]})
    assert "frontier.points.0: Value error, a pruned int8 point is made by distillation QAT" in err(
        frontier={"points": [{"imgsz": 640, "prune": 0.8, "int8": "ptq"}]})
    assert "frontier.prune_stages.0.target" in err(frontier={"prune_stages": [{"type": "prune", "target": 2}]})
    assert "max_drop bounds the accuracy of a budget's choice" in err(auto={"max_drop": 0.01})
    assert "are the budget of strategy: auto" in err(strategy="qat", auto={"latency_ms": 10})
    cfg = load_config(raw={**base, "frontier": {"imgsz": [640, 576, 512], "prune": [1.0, 0.8],
                                                "min_macs_ratio": 0.6}})
    names = [p.name for p in cfg.frontier.expand(640)]
    assert "512px_prune0.8_int8-qat" not in names and "576px_prune0.8_int8-qat" in names  # 0.51x < 0.6
    assert "640px_prune0.8_int8-ptq" not in names  # pruned points are trained (QAT)


def test_budget_refuses_an_output_dir_holding_another_run(tmp_path):
    from act.core.errors import ConfigError
    from act.orchestrate.compress import AutoCompression

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"mode": "qat"}))
    raw = _cfg(out, strategy="auto", auto={"latency_ms": 10.0})
    with pytest.raises(ConfigError, match="holds another run \\(mode 'qat'\\)"):
        AutoCompression(raw).run()
    assert json.loads((out / "summary.json").read_text()) == {"mode": "qat"}  # untouched


@needs_data
@pytest.mark.slow
def test_frontier_metric_picks_the_ranking_accuracy(frontier_run):
    import copy

    from act.core.errors import ConfigError
    from act.orchestrate.frontier_measure import summarize

    _, _, res = frontier_run
    rows = copy.deepcopy(res["points"])
    out = summarize(rows, "fidelity_pose_map50", res["runtime"])
    assert out["metric"] == "fidelity_pose_map50"
    assert [r["accuracy"] for r in out["points"]] == [r["metrics"]["fidelity_pose_map50"] for r in rows]
    with pytest.raises(ConfigError, match="frontier.metric: 'nope' is not measured"):
        summarize(copy.deepcopy(res["points"]), "nope", res["runtime"])


def test_int8_points_count_the_macs_of_their_float_structure():
    """torch-pruning's counter skips fake-quantized convs (a subclass); a point counts its float structure."""
    from act.blocks.prune import model_cost
    from act.core.config import load_config
    from act.orchestrate.frontier_measure import float_structure
    from act.run.build import build_student, load_frozen

    teacher, family, _ = load_frozen("yolo11n-pose")
    cfg = load_config(raw={"model": {"teacher": "yolo11n-pose"}, "data": {"train": "pkg:ultralytics/assets"}})
    student = build_student(teacher, cfg, family).eval()
    t_macs, t_params = model_cost(teacher, 160, family)
    assert model_cost(student, 160, family)[0] < 0.1 * t_macs  # what the counter alone sees
    macs, params = model_cost(float_structure(student), 160, family)
    assert macs == pytest.approx(t_macs, rel=1e-3) and params == pytest.approx(t_params, rel=1e-3)  # + PACT clips
    assert any(type(m).__name__ == "QuantConv2d" for m in student.modules())  # the student itself is unchanged
