"""Fault suite, part 3: bad input gets a clear answer (exit 2, what was wrong and where) and never a stack trace:
broken images, empty folders, checkpoints that are not Ultralytics models, and fuzzed configs (hypothesis)."""

import os
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fault_registry as reg
from conftest import tiny_config
from faultkit import act_cmd, cli, fault_config, make_broken_images, make_images, run, write_config


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_broken_images(tmp_path_factory.mktemp("broken_images"))


def test_inspect_image_uses_convertible_and_refuses_broken(broken):
    from act.blocks.data import inspect_image

    for kind, p in broken["used"].items():
        im, why = inspect_image(p)
        assert why is None and im.ndim == 3 and im.shape[2] == 3 and im.dtype.name == "uint8", kind
        assert 20 < im.mean() < 235, kind  # 16-bit is scaled to 8-bit, not clipped to white
    for kind, p in broken["skipped"].items():
        reg.bad_input(f"image: {kind}")
        im, why = inspect_image(p)
        assert im is None and why, kind
    assert "too large" in inspect_image(broken["skipped"]["decompression bomb"])[1]
    assert "truncated" in inspect_image(broken["skipped"]["truncated JPEG"])[1]


def test_run_on_a_folder_of_broken_images_skips_and_lists_them(tmp_path, broken):
    # 6 usable + 7 broken + 1 more usable = 14 images: 7 batches of 2; calibration (2) + 5 iterations see them all
    make_images(broken["used"]["good1"].parent.parent / "more", n=1)
    folder = broken["used"]["good1"].parent.parent
    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", folder, 5, data={"augment": False}))
    r = run(act_cmd("compress", "--config", str(cfg)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert reg.output(r.stdout, r.stderr)
    listed = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    entries = dict(line.split("\t", 1) for line in listed if not line.startswith("#"))
    assert sorted(entries) == sorted(str(p) for p in broken["skipped"].values()), entries
    assert all(entries.values())  # each with its reason
    assert f"skipped {len(broken['skipped'])} unusable image(s)" in r.stdout
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"]["count"] == len(broken["skipped"])


def test_folder_with_only_broken_images_is_a_clear_error(tmp_path, broken, capsys):
    folder = tmp_path / "all_broken"
    folder.mkdir()
    for p in broken["skipped"].values():
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", folder))
    code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.bad_input("folder of only broken images")
    assert code == 2 and reg.output(out, err)
    assert f"none of the {len(broken['skipped'])} images could be used" in err and "skipped_images.txt" in err
    assert len((tmp_path / "run" / "skipped_images.txt").read_text().splitlines()) == len(broken["skipped"]) + 1


def test_an_error_before_training_with_loader_workers_exits_promptly(tmp_path, broken):
    """The train loader's workers ignore the process group's stop signals, so the run must stop them itself also
    when it fails before its first step (here: every image broken, found while calibrating), or the interpreter's exit
    would wait for them forever."""
    from faultkit import act_cmd, run

    folder = tmp_path / "all_broken"
    folder.mkdir()
    for p in broken["skipped"].values():
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", folder))
    r = run(act_cmd("compress", "--config", str(cfg), "data.workers=2"), tmp_path, timeout=180)
    reg.bad_input("folder of only broken images, 2 loader workers")
    assert r.returncode == 2 and reg.output(r.stdout, r.stderr)
    assert "images could be used" in r.stderr


@pytest.mark.parametrize("content", ["nothing", "text files"])
def test_empty_image_folder(tmp_path, capsys, content):
    folder = tmp_path / "imgs"
    folder.mkdir()
    if content == "text files":
        (folder / "readme.txt").write_text("no images here")
    cfg = write_config(tmp_path / "c.yaml", fault_config(tmp_path / "run", folder))
    code, out, err = cli(["compress", "--config", cfg], capsys)
    reg.bad_input(f"image folder with {content}")
    assert code == 2 and reg.output(out, err)
    assert f"data.train: image source {folder} holds no images" in err


def _bad_checkpoints(folder: Path):
    from ultralytics import YOLO

    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def put(name, make, expect):
        p = folder / name
        make(p)
        out[name] = (p, expect)

    put("empty.pt", lambda p: p.write_bytes(b""), "is not a PyTorch checkpoint")
    put("noise.pt", lambda p: p.write_bytes(os.urandom(4096)), "is not a PyTorch checkpoint")
    put("text.pt", lambda p: p.write_text("model: yolo"), "is not a PyTorch checkpoint")
    put("dict.pt", lambda p: torch.save({"epoch": 3, "foo": 1}, p),
        "not an Ultralytics checkpoint: expected a dict with a 'model' module, found ['epoch', 'foo']")
    put("state_dict.pt", lambda p: torch.save(nn.Conv2d(3, 8, 3).state_dict(), p),
        "found ['bias', 'weight']")
    put("bare_module.pt", lambda p: torch.save(nn.Linear(2, 2), p), "found Linear")
    put("linear_model.pt", lambda p: torch.save({"model": nn.Linear(2, 2)}, p), "")
    put("classify.pt", lambda p: torch.save({"model": YOLO("yolov8n-cls.yaml").model}, p),
        "unsupported head 'Classify'")
    put("segment.pt", lambda p: torch.save({"model": YOLO("yolov8n-seg.yaml").model}, p),
        "unsupported head 'Segment'")
    return out


def test_checkpoints_that_are_not_supported_ultralytics_models(tmp_path, capsys):
    for name, (path, expect) in _bad_checkpoints(tmp_path / "ckpts").items():
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_config(tmp_path / name, model={"teacher": str(path)}))
        code, out, err = cli(["compress", "--config", cfg], capsys)
        reg.bad_input("teacher checkpoint: " + name)
        assert code == 2, (name, err)
        assert reg.output(out, err), name
        assert str(path) in err and expect in err, (name, err)


# ---- fuzzed configs ----------------------------------------------------------------------------------------------
class _Valid(Exception):
    """The config passed validation and the run would start (the fuzz stops it there)."""


KEYS = [k for k in (
    "model", "model.teacher", "model.task", "data", "data.train", "data.imgsz", "data.batch_size", "data.workers",
    "data.augment", "data.augment.flip", "data.augment.scale", "data.augment.mosaic", "data.augment.hsv",
    "data.max_images", "data.cache", "distill",
    "distill.nodes", "distill.losses", "distill.losses.box", "distill.losses.box.type", "distill.losses.kpt.weight",
    "distill.node_weights", "distill.pseudo_labels.weight", "quant", "quant.enabled", "quant.weight.granularity",
    "quant.activation.ema_rate",
    "quant.activation.alpha_init", "quant.skip", "quant.calib_batches", "quant.init_from", "train",
    "train.iterations", "train.epochs", "train.lr", "train.optimizer", "train.grad_clip", "train.amp",
    "train.device", "train.nan_policy", "train.nan_policy.max_consecutive", "train.nan_policy.lr_factor", "eval",
    "eval.data", "eval.callback", "eval.metric", "eval.every", "eval.fidelity.images", "export.opset",
    "export.parity_tolerance", "ptq.calibrator", "ptq.percentile", "ptq.source", "output_dir")]

names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.just("auto"), st.just([]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(names, c, max_size=3)),
                      max_leaves=6)
paths = st.one_of(st.sampled_from(KEYS), st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(KEYS), names), names)
mutation = st.one_of(st.tuples(st.just("set"), paths, values), st.tuples(st.just("del"), st.sampled_from(KEYS),
                                                                           st.none()))


def _apply(cfg, op, path, value):
    keys = path.split(".")
    cur = cfg
    for k in keys[:-1]:
        if not isinstance(cur.get(k), dict):
            if op == "del":
                return
            cur[k] = {}
        cur = cur[k]
    if op == "del":
        cur.pop(keys[-1], None)
    else:
        cur[keys[-1]] = value


@pytest.fixture
def fuzz_env(tmp_path, monkeypatch):
    from act.run.trainer import Trainer

    def stop(self):
        raise _Valid

    from act.run.ptq import PostTrainingQuantization

    monkeypatch.setattr(Trainer, "setup", stop)
    monkeypatch.setattr(PostTrainingQuantization, "setup", stop)  # strategy auto / ptq start with a PTQ setup
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _names_a_key(err, keys, also=()):
    """Does the message name (a parent or a child of) one of the `keys`? Error lines read '  key.path: why'.
    Setting a key under a mapping the config did not have creates that mapping: then its missing required sibling
    (`distill.losses.kpt.type: missing required key` after setting `distill.losses.kpt.weight`) is the answer."""
    import re

    named = re.findall(r"^  ([^\s:]+):", err, re.M)
    missing = re.findall(r"^  ([^\s:]+): missing required key", err, re.M)
    parent = lambda k: k.rsplit(".", 1)[0]  # noqa: E731
    return any(n == k or k.startswith(n + ".") or n.startswith(k + ".") for n in named for k in keys) or any(
        parent(n) == parent(k) for n in missing for k in keys) or any(a in err for a in also)


def _expect_clear_error(fuzz_env, capsys, args, keys=(), also=()):
    try:
        code, out, err = cli(args, capsys)
    except _Valid:
        capsys.readouterr()
        return None
    assert code == 2, (args, err)
    assert reg.output(out, err)
    assert "act: error: " in err and len(err.splitlines()) < 40, err
    if keys:
        assert _names_a_key(err, keys, also), (keys, err)
    return err


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_fuzzed_configs_exit_2_naming_the_key(fuzz_env, capsys, mutations):
    cfg = tiny_config("runs/fuzz")
    for op, path, value in mutations:
        if path == "output_dir" and isinstance(value, str):
            assume(not value.startswith(("/", "~")) and ".." not in value)  # stay inside the test's folder
        _apply(cfg, op, path, value)
    p = fuzz_env / "fuzz.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the message names the key path of (at least) one mutation, down to where it went wrong
    err = _expect_clear_error(fuzz_env, capsys, ["compress", "--config", p], keys=[m[1] for m in mutations])
    if err is not None:
        reg.bad_input("fuzzed config")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_fuzzed_yaml_text(fuzz_env, capsys, text):
    p = fuzz_env / "fuzz.yaml"
    p.write_text(text)
    if _expect_clear_error(fuzz_env, capsys, ["compress", "--config", p]) is not None:
        reg.bad_input("fuzzed YAML text")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", paths, st.text(max_size=15)), min_size=1, max_size=3))
def test_fuzzed_cli_overrides(fuzz_env, capsys, overrides):
    assume(not any(o.startswith("output_dir=") for o in overrides))
    p = fuzz_env / "base.yaml"
    p.write_text(yaml.safe_dump(tiny_config("runs/fuzz"), sort_keys=False))
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    err = _expect_clear_error(fuzz_env, capsys, ["compress", "--config", p, *overrides], keys=keys,
                              also=[f"override {k!r}" for k in keys] + ["unrecognized arguments: -"])
    if err is not None:
        reg.bad_input("fuzzed CLI override")
