"""Two-process DDP compression on CPU (gloo) through the real CLI path: `act compress --devices cpu,cpu`."""

import subprocess
import sys

import pytest
import torch
import yaml

from act.blocks.checkpoint import load_checkpoint
from conftest import cli_env, tiny_config


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out, dumps = root / "out", root / "dumps"
    cfg = tiny_config(out, data={"imgsz": 96, "batch_size": 2, "augment": True},
                      train={"iterations": 4, "log_every": 2, "checkpoint_every": 2, "lr": 1e-3},
                      eval={"before": False, "fidelity": {"images": 2}}, export={"onnx": False})
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = cli_env()
    env["ACT_DEBUG_STATE_DIR"] = str(dumps)
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "act", "compress", "--config", str(path), "--devices", "cpu,cpu"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    states = [torch.load(dumps / f"rank{i}.pt") for i in range(2)]
    return out, states, r


def test_ranks_end_identical(ddp_run):
    _, (s0, s1), _ = ddp_run
    st0, st1 = s0["state"], s1["state"]
    assert st0.keys() == st1.keys()
    absmax = [k for k in st0 if k.endswith("running_absmax")]
    alphas = [k for k in st0 if k.endswith(".alpha")]
    assert len(absmax) > 50 and len(alphas) == len(absmax)
    for k in st0:
        assert torch.equal(st0[k], st1[k]), k
    # the ranks trained on different images (else identity would prove nothing)
    assert s0["loss_history"] != s1["loss_history"]
    assert s0["iterations"] == s1["iterations"] == 4


def test_only_rank0_wrote_and_checkpoint_matches(ddp_run):
    out, (s0, _), r = ddp_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.pt", "config.yaml", "last.pt", "report", "report.html", "report.md", "summary.json",
                     "tensorboard"], names
    events = [p for p in (out / "tensorboard").iterdir() if p.name.startswith("events.")]
    assert len(events) == 1  # one event file: rank 0's
    assert r.stdout.count("act: done") == 1
    ck = load_checkpoint(out / "last.pt")
    assert ck["act"]["iteration"] == 4
    assert ck["act"]["data_position"] == (2 + 4) * 2 * 2  # calibration + training batches, global samples
    saved = ck["model"].state_dict()
    for k, v in s0["state"].items():
        assert torch.equal(saved[k], v), k


def test_resume_on_another_number_of_processes(ddp_run, tmp_path):
    """The 2-rank run's last.pt (iteration 4, 24 samples in) resumed by one process: same stream, next samples."""
    import shutil

    from act import AutoCompression

    out, (s0, _), _ = ddp_run
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    cfg = tiny_config(run, data={"imgsz": 96, "batch_size": 2, "augment": True},
                      train={"iterations": 6, "log_every": 2, "checkpoint_every": 2, "lr": 1e-3},
                      eval={"before": False, "fidelity": {"images": 2}}, export={"onnx": False})
    ac = AutoCompression(cfg)
    ac.run(resume=True, force=True)  # (force: train.iterations 4 -> 6 differs from the run's config)
    assert len(ac.loss_history) == 2  # iterations 5 and 6 only
    ck = load_checkpoint(run / "last.pt")
    assert ck["act"]["iteration"] == 6
    assert ck["act"]["data_position"] == 24 + 2 * 2  # continues the global stream, one rank of batch 2
