"""Fault suite, part 1: a real `act compress` in subprocesses on CPU (yolo11n-pose, 96 px) stopped by SIGINT,
SIGTERM and SIGKILL (in the middle of writing a checkpoint), then resumed: the resumed run must end in the
bit-identical state of an uninterrupted run. Also the resume rules (changed config, another run's folder)."""

import os
import re
import shlex
import shutil
import signal

import pytest

import fault_registry as reg
from faultkit import (act_cmd, assert_same_state, fault_config, make_images, popen, run, state_of, wait_for_line,
                      write_config)

ITERS = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("fault_images"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images):
    """One uninterrupted run (the state every interrupted-and-resumed run must reach)."""
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "c.yaml", fault_config(root / "run", images, ITERS))
    r = run(act_cmd("compress", "--config", str(cfg)), root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert state_of(root / "run" / "last.pt")["act"]["iteration"] == ITERS
    return root / "run"


def _start(tmp_path, images, launcher):
    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", images, ITERS))
    return popen(act_cmd("compress", "--config", str(cfg), launcher=launcher), tmp_path), tmp_path / "run"


def _resume_from_message(stderr, tmp_path, extra=()):
    """Run the exact resume command that act printed (with this interpreter's `python -m act` for `act`)."""
    line = next(ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("act compress"))
    args = shlex.split(line)
    assert args[0] == "act" and "--resume" in args
    r = run(act_cmd(*args[1:], *extra), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert reg.output(r.stdout, r.stderr)
    return r


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_step_saves_last_and_prints_resume(tmp_path, images, reference, sig, code):
    proc, out = _start(tmp_path, images, ["--step-delay", "0.2"])
    wait_for_line(proc, "act-test: step 3")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    reg.fault(signal.Signals(sig).name)
    assert proc.returncode == code, stderr[-3000:]
    assert reg.output(stdout, stderr)
    # the signal lands after step 3 (or, on a very busy machine, during step 4): that step is finished and saved
    m = re.search(rf"stopped by {signal.Signals(sig).name} at iteration (\d+)/{ITERS}; last.pt saved", stderr)
    assert m and 3 <= int(m.group(1)) < ITERS, stderr
    stopped = int(m.group(1))
    assert reg.checkpoint(state_of(out / "last.pt")["act"]["iteration"] == stopped)  # finished steps are not lost
    assert f"act compress --config {out / 'config.yaml'} --resume" in stderr
    if sig == signal.SIGINT:  # (SIGTERM takes the same path: one resume suffices to prove the state is complete)
        r = _resume_from_message(stderr, tmp_path)
        assert f"resuming {out} at iteration {stopped}/{ITERS}" in r.stdout
        assert_same_state(reference / "last.pt", out / "last.pt")


def test_sigterm_to_the_whole_process_group_spares_the_loader_workers(tmp_path, images):
    """`timeout`, Slurm and a terminal's Ctrl-C signal every process of the group, loader workers included: the
    workers must keep serving until the main process has finished its step and saved (they used to die at once and
    the run crashed with 'DataLoader worker ... killed by signal: Terminated' instead of saving)."""
    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", images, ITERS))
    proc = popen(act_cmd("compress", "--config", str(cfg), "data.workers=2", launcher=["--step-delay", "0.2"]),
                 tmp_path, new_session=True)
    wait_for_line(proc, "act-test: step 3")
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    reg.fault("SIGTERM to the process group, 2 loader workers")
    assert proc.returncode == 143, stderr[-3000:]
    assert reg.output(stdout, stderr)
    m = re.search(rf"stopped by SIGTERM at iteration (\d+)/{ITERS}; last.pt saved", stderr)
    assert m, stderr[-3000:]
    assert reg.checkpoint(state_of(tmp_path / "run" / "last.pt")["act"]["iteration"] == int(m.group(1)))


def test_kill9_while_writing_checkpoint_then_resume_is_bit_identical(tmp_path, images, reference):
    proc, out = _start(tmp_path, images, ["--kill-in-save", "2"])  # dies inside the write of last.pt @ iteration 4
    stdout, stderr = proc.communicate(timeout=240)
    reg.fault("SIGKILL while writing last.pt")
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert "killing myself while writing last.pt" in stdout
    assert list(out.glob(".last.pt.*.tmp")), "the kill should have left a half-written temp file"
    assert reg.checkpoint(state_of(out / "last.pt")["act"]["iteration"] == 2)  # the previous checkpoint is intact
    # resume, with loader workers this time: the data stream does not depend on them
    r = run(act_cmd("compress", "--config", str(out / "config.yaml"), "--resume", "data.workers=1"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert reg.output(r.stdout, r.stderr)
    assert f"resuming {out} at iteration 2/{ITERS}" in r.stdout
    assert not list(out.glob(".*.tmp"))
    assert_same_state(reference / "last.pt", out / "last.pt")


@pytest.fixture
def finished_copy(tmp_path, reference):
    import yaml

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["output_dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def test_resume_with_changed_config_refused_with_diff_then_forced(tmp_path, finished_copy, capsys):
    from act.cli.main import main

    cfg = str(finished_copy / "config.yaml")
    before = (finished_copy / "last.pt").read_bytes()
    code = main(["compress", "--config", cfg, "--resume", "train.lr=0.001", "data.imgsz=128", "data.workers=3"])
    err = capsys.readouterr().err
    reg.bad_input("resume with a changed config")
    assert code == 2 and reg.output(err)
    assert "config differs" in err and "train.lr: 0.0001 -> 0.001" in err
    assert "data.imgsz: 96 -> 128" in err and "--force" in err and "workers" not in err  # (workers may change)
    assert reg.checkpoint((finished_copy / "last.pt").read_bytes() == before)
    # --force continues with the new values (here: two more iterations)
    assert main(["compress", "--config", cfg, "--resume", "--force", f"train.iterations={ITERS + 2}"]) == 0
    assert state_of(finished_copy / "last.pt")["act"]["iteration"] == ITERS + 2


def test_output_dir_of_another_run_refused_unless_exist_ok(tmp_path, finished_copy, capsys):
    from act.cli.main import main

    cfg = str(finished_copy / "config.yaml")
    before = (finished_copy / "last.pt").read_bytes()
    reg.bad_input("output_dir holding another run")
    assert main(["compress", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert reg.output(err) and "already holds a run (last.pt)" in err and "--exist-ok" in err
    assert reg.checkpoint((finished_copy / "last.pt").read_bytes() == before)
    assert main(["compress", "--config", cfg, "--exist-ok", "train.iterations=1"]) == 0
    assert state_of(finished_copy / "last.pt")["act"]["iteration"] == 1


def test_resume_without_a_run_refused(tmp_path, images, capsys):
    from act.cli.main import main

    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "empty_run", images))
    reg.bad_input("resume with nothing to resume")
    assert main(["compress", "--config", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert reg.output(err) and "nothing to resume" in err and "last.pt does not exist" in err
