"""`strategy: auto` on the real yolo11n-pose teacher (CPU, 160 px, coco-pose-mini): a loose target stops after the
PTQ probe, a tight one goes on to QAT (from the best PTQ state) and stops early once the QAT target is met;
`quant.skip: auto` keeps at most its budget of layers in float and writes their names into the run's config."""

import json

import pytest
import yaml
from torch import nn

from act.blocks.checkpoint import load_checkpoint
from act.core.config import validate_config
from act.core.errors import ConfigError
from act.blocks.quant import QuantConv2d
from conftest import mini_config, tiny_config


def _decisions(summary):
    return [d["decision"] for d in summary["decisions"]]


def test_loose_target_stops_after_ptq(auto_runs):
    s, out = auto_runs["loose"], auto_runs["base"] / "loose"
    assert s["mode"] == "ptq" and s["strategy"]["stage"] == "ptq"
    assert "stop after PTQ" in _decisions(s) and not any("QAT" in d for d in _decisions(s))
    assert (out / "ptq.pt").is_file() and (out / "student.onnx").is_file() and not (out / "last.pt").exists()
    probe = s["strategy"]["probe"]
    assert [p["calibrator"] for p in probe] == ["percentile 99.99", "mse"]
    best = max(p["value"] for p in probe)
    chosen = next(d for d in s["decisions"] if d["decision"].startswith("best calibrator"))
    assert chosen["value"] == pytest.approx(best) and best >= 0.05
    assert s["onnx"]["parity"]["passed"]
    assert json.loads((out / "decisions.json").read_text()) == s["decisions"]


def test_skip_auto_obeys_budget_and_names_layers(auto_runs):
    s, out = auto_runs["loose"], auto_runs["base"] / "loose"
    names = s["auto_skip"]["layers"]
    assert 1 <= len(names) <= 2 and all(n.startswith("model.23.cv4.") for n in names)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["quant"]["skip"] == names  # explicit names, not 'auto'
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["auto_skip"]["chosen"] == names
    assert names == [r["name"] for r in sens["layers"][: len(names)]]  # the top of the ranking
    student = load_checkpoint(out / "ptq.pt")["model"]
    convs = {n: m for n, m in student.named_modules() if isinstance(m, nn.Conv2d)}
    floats = sorted(n for n, m in convs.items() if not isinstance(m, QuantConv2d))
    assert floats == sorted(names + ["model.23.dfl.conv"])
    assert s["quantized_layers"] == len(convs) - len(names) - 1


def test_tight_target_goes_on_to_qat_and_stops_early(auto_runs):
    s, out = auto_runs["tight"], auto_runs["base"] / "tight"
    d = _decisions(s)
    assert "go on to distillation QAT" in d and "stop after PTQ" not in d
    assert "stop early at iteration 2/4" in d
    assert s["mode"] == "qat" and s["iterations"] == 2 and s["strategy"]["stopped_early_at"] == 2
    assert load_checkpoint(out / "last.pt")["act"]["iteration"] == 2
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["strategy"] == "qat" and cfg["quant"]["init_from"] == str(out / "ptq.pt")  # QAT from the PTQ state
    go = next(x for x in s["decisions"] if x["decision"] == "go on to distillation QAT")
    assert go["value"] < go["threshold"] == 0.999
    assert s["metrics"]["before"]["student_init"]["fidelity_pose_map50_95"] == pytest.approx(go["value"])


def test_target_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="auto.target"):
        validate_config(mini_config(tmp_path, auto={"target": {"metric": "fidelity_pose_map50_95"}}))
    with pytest.raises(ConfigError, match="strategy"):
        validate_config(mini_config(tmp_path, strategy="fast"))
    from act.core.config import TargetConfig
    from act.core.targets import check_target

    with pytest.raises(ConfigError, match="no_such_metric"):
        check_target(TargetConfig(metric="no_such_metric", min=0.5), {"fidelity_pose_map50_95": 0.9}, {}, "pose")
    with pytest.raises(ConfigError, match="max_drop"):
        check_target(TargetConfig(metric="fidelity_snr_db_mean", max_drop=1), {"fidelity_snr_db_mean": 20.0}, {}, "pose")
    ok, info = check_target(TargetConfig(metric="pose_map50_95", max_drop=0.02), {"pose_map50_95": 0.49},
                            {"pose_map50_95": 0.52}, "pose")
    assert not ok and info["threshold"] == pytest.approx(0.50)
    ok, _ = check_target(TargetConfig(max_drop=0.1), {"fidelity_pose_map50_95": 0.91}, {}, "pose")
    assert ok  # fidelity: the teacher's own value is 1.0


def test_prune_target_runs_prune_then_quant_stages(tmp_path):
    """auto.prune (a speed target) turns `auto` into the staged pipeline: pruned to the MACs target, then INT8."""
    from act.orchestrate.strategy import run_strategy

    cfg = validate_config(tiny_config(tmp_path, strategy="auto", auto={"prune": {"macs_ratio": 0.8}},
                                      train={"iterations": 5, "checkpoint_every": 5}, eval={"every": 5},
                                      report={"enabled": False}, export={"latency_runs": 0}))
    s = run_strategy(cfg)
    assert s["decisions"][0]["decision"].startswith("prune to 0.8x the teacher's MACS")
    assert json.loads((tmp_path / "decisions.json").read_text())[0] == s["decisions"][0]
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert [st["type"] for st in written["stages"]] == ["prune", "quant"] and written["auto"]["prune"] is None
    pruned = json.loads((tmp_path / "stages" / "1_prune" / "summary.json").read_text())
    assert abs(pruned["cost"]["macs_ratio"] - 0.8) <= 0.05 * 0.8
    assert (tmp_path / "stages" / "2_quant" / "student.onnx").is_file()
    with pytest.raises(ConfigError, match="exactly one of macs_ratio, params_ratio"):
        validate_config(mini_config(tmp_path, auto={"prune": {"macs_ratio": 0.5, "params_ratio": 0.5}}))


def test_prune_target_without_pruning_is_a_clear_error(tmp_path, monkeypatch):
    import act.orchestrate.strategy as st

    monkeypatch.setattr(st, "pruning_available", lambda: False)
    cfg = validate_config(mini_config(tmp_path, auto={"prune": {"macs_ratio": 0.5}}))
    with pytest.raises(ConfigError, match="auto.prune"):
        st.run_strategy(cfg)
    assert not (tmp_path / "ptq.pt").exists()  # refused before any work
