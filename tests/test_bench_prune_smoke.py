"""tools/bench_prune.py --quick: the teacher and the pruned rows of two targets (the frontier), end to end, on CPU at
160 px with a few images."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / "../shared/data/coco-pose-mini").resolve()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data.yaml").is_file(), reason=f"coco-pose-mini not found at {SHARED}"),
]


def _bench_prune():
    spec = importlib.util.spec_from_file_location("act_bench_prune", ROOT / "tools" / "bench_prune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_bench_prune_frontier(tmp_path, monkeypatch):
    mod = _bench_prune()
    monkeypatch.setenv("ACT_NO_PROGRESS", "1")
    argv = ["--data", str(SHARED), "--out", str(tmp_path), "--quick", "--targets", "0.8", "0.6", "--parallel", "2",
            "--onnx-rows"]
    rc = mod.main(argv)
    report = json.loads((tmp_path / "bench_prune.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rc == 0, [r.get("error") for r in report["rows"]]
    kinds = ["(FP32)", "+ INT8", "+ INT8 ONNX (onnxruntime)"]
    assert list(rows) == ["FP32 teacher"] + [f"prune {t}x MACs {k}" for t in ("0.8", "0.6") for k in kinds]
    teacher = rows["FP32 teacher"]
    assert 0 < teacher["pose_map50_95"] <= 1 and teacher["macs_ratio"] == 1.0
    for t in (0.8, 0.6):
        for k in kinds:
            r = rows[f"prune {t:g}x MACs {k}"]
            assert "pose_map50_95" in r and "pose_map50" in r and "box_map50_95" in r
            assert abs(r["macs_ratio"] - t) <= 0.03 and r["gmacs"] < (t + 0.05) * teacher["gmacs"]
            assert r["mparams"] < teacher["mparams"] and r["ort_cpu_ms"] > 0
        fp32 = rows[f"prune {t:g}x MACs (FP32)"]
        assert fp32["prune_steps"][-1]["macs_ratio"] == pytest.approx(fp32["macs_ratio"], abs=0.01)
    assert rows["prune 0.6x MACs (FP32)"]["gmacs"] < rows["prune 0.8x MACs (FP32)"]["gmacs"]
    md = (tmp_path / "bench_prune.md").read_text()
    assert "| method | pose mAP50-95 | pose mAP50 |" in md and "| prune 0.6x MACs + INT8 |" in md
    assert "Recipe: yolo11n_pose_prune_qat.yaml with --quick." in md  # the flags that changed the recipe
    assert "`act compress --config yolo11n_pose_prune_qat.yaml stages.0.target=0.6 " in md  # each row's rerun

    # a run cut before its quant stage finished (a device call's limit) still gives its prune row
    (tmp_path / "runs" / "prune_qat_0.6" / "stages" / "2_quant" / "summary.json").unlink()
    b = mod.PruneBench(mod.parse_args(argv))
    assert b.stage_row(0.6, 0)["macs_ratio"] == pytest.approx(0.6, abs=0.03)
    with pytest.raises(RuntimeError, match="did not finish"):
        b.stage_row(0.6, 1)
