"""Fault suite, part 2: faults during training, in this process (act's CLI entry point `main`, real yolo11n-pose at
96 px on CPU): NaN/Inf losses and gradients, CUDA out of memory, a full disk and a read-only output folder."""

import errno
import json
import math
import os

import pytest
import torch

import fault_registry as reg
from faultkit import ReadOnly, cli, fault_config, inject_nan, make_images, state_of, write_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train_fault_images"), n=4)


def _finite(ckpt):
    return all(bool(torch.isfinite(v).all()) for v in ckpt["model"].state_dict().values() if v.is_floating_point())


def test_nan_loss_and_gradient_are_skipped_then_the_last_good_state_restored(tmp_path, images, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml", fault_config(
        tmp_path / "run", images, 8, train={"nan_policy": {"max_consecutive": 3, "lr_factor": 0.5, "max_restores": 2}}))
    inject_nan(monkeypatch, nan_loss=(3, 4, 5), nan_grad=(7,))
    code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.fault("NaN loss", 3)
    reg.fault("NaN gradient", 1)
    assert code == 0, err
    assert reg.output(out, err)
    assert "non-finite loss at iteration 3: step skipped" in out
    assert "3 non-finite steps in a row at iteration 5: restored the last good state (iteration 2)" in out
    assert "non-finite gradient at iteration 7: step skipped" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 4
    assert summary["nan_policy"]["restores"] == 1 and summary["nan_policy"]["lr_scale"] == 0.5
    last = state_of(tmp_path / "run" / "last.pt")
    assert _finite(last) and last["act"]["iteration"] == 8
    assert last["act"]["scheduler"]["base_lrs"][0] == pytest.approx(0.5 * 1e-4)  # the lr was lowered
    assert last["act"]["nan_guard"]["skipped"] == 4
    assert summary["quant_health"] == {"collapsed": 0, "quantizers": {}}


def test_nan_policy_on_the_sync_free_path(tmp_path, images, monkeypatch, capsys):
    """The CUDA/DDP step (no host sync: the GradScaler skips non-finite updates on the device, the policy runs on
    device-side counters at log steps), forced on CPU."""
    from act.run.trainer import Trainer

    real = Trainer.setup_optimizer

    def setup_optimizer(self):
        real(self)
        self.sync_free = True
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2**30)

    monkeypatch.setattr(Trainer, "setup_optimizer", setup_optimizer)
    cfg = write_config(tmp_path / "c.yaml", fault_config(
        tmp_path / "run", images, 8, train={"log_every": 1, "nan_policy": {"max_consecutive": 3, "max_restores": 2}}))
    inject_nan(monkeypatch, nan_loss=(3, 4, 5))
    code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.fault("NaN loss (device-side path)", 3)
    assert code == 0 and reg.output(out, err), err
    assert "3 non-finite steps in a row before iteration 5: restored the last good state (iteration 2)" in out
    last = state_of(tmp_path / "run" / "last.pt")
    assert _finite(last) and last["act"]["nan_guard"]["skipped"] == 3 and last["act"]["nan_guard"]["restores"] == 1
    assert all(float(v) > 0 for k, v in last["model"].state_dict().items() if k.endswith("running_absmax"))


def test_nan_without_end_stops_with_exit_4_and_keeps_best(tmp_path, images, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml", fault_config(
        tmp_path / "run", images, 12, train={"nan_policy": {"max_consecutive": 2, "max_restores": 1}},
        eval={"callback": "act_test_callbacks:output_energy", "metric": "energy", "every": 2}))
    inject_nan(monkeypatch, nan_loss=range(5, 100))
    code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.fault("NaN loss without end", 4)
    assert code == 4, err
    assert reg.output(out, err)
    assert "training diverged at iteration 8" in err and "max_restores=1" in err and "best.pt" in err
    best, last = state_of(tmp_path / "run" / "best.pt"), state_of(tmp_path / "run" / "last.pt")
    assert reg.checkpoint(_finite(best) and best["act"]["best_iteration"] in (2, 4))
    assert reg.checkpoint(_finite(last) and last["act"]["iteration"] == 6)


def test_cuda_out_of_memory_names_a_batch_size_and_keeps_progress(tmp_path, images, monkeypatch, capsys):
    from act.run.trainer import Trainer

    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", images, 4, train={"checkpoint_every": 4}))
    real = Trainer.train_step
    calls = {"n": 0}

    def step(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images)

    monkeypatch.setattr(Trainer, "train_step", step)
    code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.fault("CUDA out of memory")
    assert code == 5 and reg.output(out, err)
    assert "CUDA out of memory during training at data.batch_size=2" in err and "Try data.batch_size=1" in err
    assert "--resume --force data.batch_size=1" in err
    assert reg.checkpoint(state_of(tmp_path / "run" / "last.pt")["act"]["iteration"] == 2)  # the 2 finished steps
    # the suggested command continues the run
    code, out, err = cli(["compress", "--config", cfg, "--resume", "--force", "data.batch_size=1"], capsys)
    assert code == 0, err
    assert "resuming" in out and state_of(tmp_path / "run" / "last.pt")["act"]["iteration"] == 4


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS])
def test_write_error_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, images, monkeypatch, capsys, err_no):
    """The 2nd last.pt fails to write: disk full (fsync fails) or the folder turns read-only (a real read-only
    mount where possible)."""
    from act.run.trainer import Trainer

    out_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", fault_config(out_dir, images, 6))
    real_save, real_fsync = Trainer.save, os.fsync
    trouble = {"on": False, "ro": None}

    def save(self, name, iteration, training_state=True):
        if name == "last.pt" and iteration >= 4 and not trouble["on"]:
            trouble["on"] = True
            if err_no == errno.EROFS:
                trouble["ro"] = ReadOnly(out_dir).__enter__()
        return real_save(self, name, iteration, training_state)

    def fsync(fd):
        if trouble["on"] and (err_no == errno.ENOSPC or trouble["ro"].how is None):
            raise OSError(err_no, os.strerror(err_no))
        return real_fsync(fd)

    monkeypatch.setattr(Trainer, "save", save)
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        code, out, err = cli(["compress", "--config", cfg], capsys)
    finally:
        if trouble["ro"] is not None:
            trouble["ro"].__exit__()
    reg.fault("disk full while writing last.pt" if err_no == errno.ENOSPC else
              f"output dir turned read-only ({(trouble['ro'].how or 'simulated')})")
    assert code == 5 and reg.output(out, err)
    assert f"could not write {out_dir / 'last.pt'}: {os.strerror(err_no)}" in err
    assert f"the previous checkpoint at {out_dir / 'last.pt'} is intact" in err
    assert reg.checkpoint(state_of(out_dir / "last.pt")["act"]["iteration"] == 2)
    assert not list(out_dir.glob(".*.tmp"))


def test_read_only_output_dir_fails_before_any_work(tmp_path, images, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    cfg = write_config(tmp_path / "c.yaml", fault_config(out_dir, images))
    with ReadOnly(out_dir) as ro:
        if ro.how is None:  # neither a mount nor chmod can make it read-only here: simulate the filesystem's answer
            import tempfile

            def mkstemp(*a, **k):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out_dir))

            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.fault(f"read-only output dir ({ro.how or 'simulated'})")
    assert code == 5 and reg.output(out, err)
    assert f"could not write to output_dir {out_dir}" in err
    assert "read-only" in err or "ermission denied" in err


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO])
def test_atomic_write_failure_leaves_the_old_file(tmp_path, monkeypatch, err_no):
    """Unit level, every way a write can fail mid-file (torch.save sees it as a RuntimeError from its writer)."""
    from act.core.errors import ResourceError
    from act.core.fileio import atomic_torch_save, atomic_write_bytes

    target = tmp_path / "student.onnx"
    target.write_bytes(b"old export")
    real_fdopen = os.fdopen

    class Failing:
        """The temp file: every write fails, as on a full or failing disk."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(err_no, os.strerror(err_no))

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Failing(real_fdopen(*a, **k)))
    for write in (lambda: atomic_write_bytes(target, b"new export"),
                  lambda: atomic_torch_save({"w": torch.zeros(10000)}, target)):
        with pytest.raises(ResourceError) as e:
            write()
        reg.fault(f"{errno.errorcode[err_no]} mid-write")
        assert str(target) in str(e.value) and os.strerror(err_no) in str(e.value)
        assert "is intact" in str(e.value)
        assert reg.checkpoint(target.read_bytes() == b"old export")
        assert not list(tmp_path.glob(".*.tmp"))


def test_collapsed_quantizer_ranges_are_detected():
    from act.run.build import build_student, load_teacher
    from act.core.config import load_config
    from act.blocks.quant import calibrate, quantized_modules
    from act.blocks.quant.health import collapsed_quantizers
    from conftest import tiny_config

    cfg = load_config(raw=tiny_config("unused"))
    teacher, family, _ = load_teacher(cfg)
    student = build_student(teacher, cfg, family)
    calibrate(student, lambda m: m(torch.rand(1, 3, 64, 64)))
    assert collapsed_quantizers(student) == {}  # a healthy calibrated student
    first = {}  # quantizer -> the first layer that uses it (shared quantizers are reported under that name)
    for n, m in quantized_modules(student).items():
        first.setdefault(id(m.input_quantizer), n)
    names = sorted(set(first.values()), key=list(quantized_modules(student)).index)
    a, b, c = names[3], names[10], names[20]
    with torch.no_grad():
        student.get_submodule(a).input_quantizer.alpha.fill_(0.0)           # PACT alpha -> 0
        student.get_submodule(b).input_quantizer.running_absmax.fill_(0.0)  # EMA range -> 0 (scale 0)
        student.get_submodule(c).weight[0].zero_()                         # a dead output channel
    bad = collapsed_quantizers(student)
    reg.fault("collapsed quantizer ranges", 3)
    assert set(bad) == {f"{a}.input_quantizer", f"{b}.input_quantizer", f"{c}.weight_quantizer"}
    assert "PACT alpha collapsed" in bad[f"{a}.input_quantizer"]
    assert "scale 0" in bad[f"{b}.input_quantizer"]
    assert "1/" in bad[f"{c}.weight_quantizer"]
