"""tools/bench_prune.py --quick: the teacher and both pruned rows, end to end, on CPU at 160 px with a few images."""

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


def test_quick_bench_prune(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("act_bench_prune", ROOT / "tools" / "bench_prune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("ACT_NO_PROGRESS", "1")
    rc = mod.main(["--data", str(SHARED), "--out", str(tmp_path), "--quick"])
    report = json.loads((tmp_path / "bench_prune.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rc == 0, [r.get("error") for r in report["rows"]]
    assert list(rows) == ["FP32 teacher", "prune 0.6x MACs (FP32)", "prune 0.6x MACs + INT8"]
    teacher, fp32, int8 = rows.values()
    assert 0 < teacher["pose_map50_95"] <= 1 and teacher["macs_ratio"] == 1.0
    for r in (fp32, int8):
        assert "pose_map50_95" in r and "pose_map50" in r
        assert abs(r["macs_ratio"] - 0.6) <= 0.03 and r["gmacs"] < 0.65 * teacher["gmacs"]
        assert r["mparams"] < teacher["mparams"] and r["ort_cpu_ms"] > 0
    assert fp32["prune_steps"][-1]["macs_ratio"] == pytest.approx(fp32["macs_ratio"], abs=0.01)
    md = (tmp_path / "bench_prune.md").read_text()
    assert "| method | pose mAP50-95 | pose mAP50 |" in md and "| prune 0.6x MACs + INT8 |" in md
    assert "Recipe: yolo11n_pose_prune_qat.yaml as committed." in md  # or the --set options that changed it
