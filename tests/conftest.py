import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("ACT_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "coco-pose-mini"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def teacher_path():
    from teachers import resolve_teacher

    return resolve_teacher("yolo11n-pose").path


@pytest.fixture(scope="session")
def assets_dir():
    from act.blocks.data import _pkg_folder

    return _pkg_folder("pkg:ultralytics/assets")


def tiny_config(out_dir, **sections):
    """A config for fast CPU runs on the packaged teacher and images."""
    cfg = {
        "model": {"teacher": "yolo11n-pose"},
        "data": {"train": "pkg:ultralytics/assets", "imgsz": 160, "batch_size": 2, "workers": 0},
        "train": {"iterations": 6, "lr": 1e-4, "log_every": 1, "checkpoint_every": 2, "device": "cpu"},
        "quant": {"calibrator": "ema", "calib_batches": 2},
        "eval": {"before": False},
        "export": {"parity_images": 2},
        "strategy": "qat",
        "output_dir": str(out_dir),
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


def interrupt_at_step(monkeypatch, n: int, cls=None):
    """Make the n-th training step of this process (1-based) raise KeyboardInterrupt, as a Ctrl-C inside a step.
    Returns the real train_step, to put back with monkeypatch.setattr(cls, "train_step", real)."""
    if cls is None:
        from act.run.trainer import Trainer as cls
    calls = {"n": 0}
    real = cls.train_step

    def step_then_interrupt(self, images):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(cls, "train_step", step_then_interrupt)
    return real


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["YOLO_OFFLINE"] = "1"
    env["ACT_NO_PROGRESS"] = "1"
    return env


def pytest_terminal_summary(terminalreporter):
    """The fault suite's one-line account (tests/fault_registry.py), when any fault test ran."""
    import fault_registry

    for line in fault_registry.summary_lines():
        terminalreporter.write_line(line)


# ---- strategy auto runs shared by test_strategy.py and test_report.py (real teacher, coco-pose-mini, 160 px) ----
DATA_YAML = REPO / "data" / "coco-pose-mini.yaml"


def mini_config(out_dir, **sections):
    """tiny_config on the coco-pose-mini pool (8 held-out fidelity images), strategy auto, a 2-calibrator probe."""
    cfg = tiny_config(out_dir, data={"train": str(DATA_YAML), "batch_size": 4},
                      train={"iterations": 4}, strategy="auto",
                      eval={"fidelity": {"images": 8}, "batch_size": 8, "every": 2},
                      ptq={"num_images": 8, "batch_size": 4, "bins": 512},
                      auto={"search": [{"calibrator": "percentile", "percentile": 99.99}, {"calibrator": "mse"}]},
                      analyze={"images": 4}, report={"latency_runs": 3})
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


@pytest.fixture(scope="session")
def auto_runs(tmp_path_factory):
    """Two `strategy: auto` runs: 'loose' (target met by PTQ; quant.skip auto with a budget of 2 layers) and
    'tight' (PTQ misses the target -> QAT, which stops early at its first eval where the looser QAT target holds)."""
    if not (SHARED / "images" / "val").is_dir():
        pytest.skip(f"coco-pose-mini not found at {SHARED}")
    from act.orchestrate.strategy import run_strategy
    from act.core.config import validate_config

    base = tmp_path_factory.mktemp("auto")
    loose = validate_config(mini_config(
        base / "loose", auto={"target": {"min": 0.05}},
        quant={"skip": "auto", "auto_skip": {"max_layers": 2}}, analyze={"layers": ["model.23.cv4.*"]}))
    tight = validate_config(mini_config(
        base / "tight", auto={"target": {"min": 0.999}, "qat_target": {"metric": "fidelity_box_map50_95", "min": 0.0}}))
    return {"base": base, "loose": run_strategy(loose), "tight": run_strategy(tight)}
