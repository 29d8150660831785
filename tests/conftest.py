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
    from act.data import _pkg_folder

    return _pkg_folder("pkg:ultralytics/assets")


def tiny_config(out_dir, **sections):
    """A config for fast CPU runs on the packaged teacher and images."""
    cfg = {
        "model": {"teacher": "yolo11n-pose"},
        "data": {"train": "pkg:ultralytics/assets", "imgsz": 160, "batch_size": 2, "workers": 0},
        "train": {"iterations": 6, "lr": 1e-4, "log_every": 1, "checkpoint_every": 2, "device": "cpu"},
        "quant": {"calib_batches": 2},
        "eval": {"before": False},
        "export": {"parity_images": 2},
        "output_dir": str(out_dir),
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


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
