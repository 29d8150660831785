"""End-to-end `act compress` on the real yolo11n-pose teacher (CPU, 160 px, packaged images)."""

import copy
import json
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

from act import AutoCompression
from act.run.trainer import Trainer
from act.blocks.checkpoint import load_checkpoint
from act.deploy.export import qdq_summary
from act.blocks.quant import QuantConv2d, quantized_modules
from conftest import cli_env, interrupt_at_step, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run with an eval callback, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, eval={"callback": "act_test_callbacks:output_energy", "metric": "energy", "every": 2})
    ac = AutoCompression(cfg)
    teacher_before = None

    orig_setup = ac.trainer.setup

    def setup():
        nonlocal teacher_before
        orig_setup()
        teacher_before = copy.deepcopy(ac.teacher.state_dict())

    ac.trainer.setup = setup
    summary = ac.run()
    return ac, summary, out, teacher_before


def test_teacher_never_changes(run):
    ac, _, _, before = run
    after = ac.teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not any(p.requires_grad for p in ac.teacher.parameters())
    assert not ac.teacher.training
    # and the student did train away from it
    s = ac.student.state_dict()
    assert any(not torch.equal(s[k].cpu(), after[k].cpu()) for k in after if k in s and after[k].is_floating_point())


def test_every_conv_quantized_except_decode(run):
    ac, summary, _, _ = run
    convs = {n: m for n, m in ac.student.named_modules() if isinstance(m, nn.Conv2d)}
    float_convs = sorted(n for n, m in convs.items() if not isinstance(m, QuantConv2d))
    assert float_convs == ["model.23.dfl.conv"]  # the DFL decode stays in float
    assert summary["quantized_layers"] == len(convs) - 1 == len(quantized_modules(ac.student))
    for m in quantized_modules(ac.student).values():
        assert m.input_quantizer.initialized and float(m.input_quantizer.running_absmax) > 0
        assert m.weight_quantizer.per_channel


def test_nodes_are_the_nine_head_branch_convs(run):
    ac, summary, _, _ = run
    names = [n.name for n in ac.nodes]
    assert len(names) == 9
    assert {n.branch for n in ac.nodes} == {"box", "cls", "kpt"}
    for name in names:
        module = ac.teacher.get_submodule(name)
        assert type(module) is nn.Conv2d and name.startswith("model.23.cv")
    assert summary["nodes"] == names


def test_loss_falls(tmp_path):
    cfg = tiny_config(tmp_path, data={"augment": False}, train={"iterations": 16, "lr": 3e-4, "scheduler": "constant"},
                      export={"onnx": False})
    ac = AutoCompression(cfg)
    ac.run()
    losses = ac.loss_history
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_best_and_last_checkpoints(run):
    ac, summary, out, _ = run
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert last["act"]["iteration"] == 6 and "optimizer" in last["act"]
    assert "optimizer" not in best["act"]  # best.pt is the model and its metrics, not the training state
    evals = [h for h in ac.history if "eval" in h]
    assert [h["iteration"] for h in evals] == [2, 4, 6]
    top = max(evals, key=lambda h: h["eval"]["energy"])
    assert best["act"]["best_iteration"] == top["iteration"] == summary["best_iteration"]
    assert summary["metrics"]["best"]["energy"] == pytest.approx(top["eval"]["energy"])


def test_resume_continues_where_last_pt_stopped(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, export={"onnx": False})
    ac = AutoCompression(cfg)
    real_step = interrupt_at_step(monkeypatch, 4)
    from act.core.errors import ActError

    with pytest.raises(ActError, match="--resume"):
        ac.run()
    assert load_checkpoint(tmp_path / "last.pt")["act"]["iteration"] == 3
    monkeypatch.setattr(Trainer, "train_step", real_step)
    ac2 = AutoCompression(cfg)
    ac2.run(resume=True)
    assert len(ac2.loss_history) == 3  # only the remaining iterations ran
    assert load_checkpoint(tmp_path / "last.pt")["act"]["iteration"] == 6


def test_onnx_has_qdq_on_every_quantized_conv_and_matches_torch(run):
    ac, summary, out, _ = run
    path = out / "student.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    q = qdq_summary(path)
    assert q["conv_quantized"] == summary["quantized_layers"]
    par = summary["onnx"]["parity"]
    assert par["passed"] and par["rel_l2"] < par["tolerance"]
    g = onnx.load(str(path)).graph
    qnodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    weights = {i.name for i in g.initializer}
    assert len([n for n in qnodes if n.input[0] in weights]) == summary["quantized_layers"]  # one per conv weight
    # activations: one Q per conv input, plus the Concat / residual Add / Upsample inputs that the TensorRT placement
    # quantizes (act.blocks.quant.placement), less the pairs onnxslim merges (one tensor, one scale, one Q)
    assert len(qnodes) > 2 * summary["quantized_layers"]
    assert summary["onnx"]["lint"]["clean"], summary["onnx"]["lint"]
    assert summary["placement"]["shared_groups"] > 0
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["task"] == "pose" and eval(meta["kpt_shape"]) == [17, 3]


def test_ultralytics_loads_onnx_and_best_pt(run, assets_dir):
    from ultralytics import YOLO

    _, _, out, _ = run
    for artifact in ("student.onnx", "best.pt"):
        model = YOLO(str(out / artifact), task="pose")
        res = model.predict(str(assets_dir / "bus.jpg"), imgsz=160, verbose=False, conf=0.01)
        assert res[0].keypoints is not None and res[0].keypoints.xy.shape[1:] == (17, 2), artifact


def test_summary_and_outputs(run):
    _, summary, out, _ = run
    for f in ("best.pt", "last.pt", "student.onnx", "config.yaml", "summary.json"):
        assert (out / f).is_file(), f
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["onnx"]["parity"]["passed"] and on_disk["iterations"] == 6
    # what the run cost end to end (setup to delivered files) and its images per second, beside the steps' own
    t, sp = on_disk["time_s"], on_disk["speed"]
    assert t["end_to_end"] >= t["train"] > t["steps"] > 0 and t["end_to_end"] >= t["train"] + t["export"] - 0.01
    assert sp["images"] == 6 * 2 and 0 < sp["end_to_end_images_per_s"] < sp["train_images_per_s"]


def test_cli_bad_config_exits_2_with_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {teacher: yolo11n-pose}\ndata: {train: pkg:ultralytics/assets}\ntrain: {lr: fast, itrations: 3}\n")
    r = subprocess.run([sys.executable, "-m", "act", "compress", "--config", str(bad)], capture_output=True,
                       text=True, env=cli_env(), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "train.lr" in r.stderr and "train.itrations: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_metric_with_nothing_evaluated_fails_before_training(tmp_path):
    """eval.metric picks best.pt; with every evaluation off best.pt would never be written and the run would end in
    'checkpoint not found'. It fails at setup instead, saying what to change; eval.metric=null keeps the last."""
    from act.core.errors import ConfigError

    off = {"data": None, "fidelity": {"enabled": False}}
    cfg = tiny_config(tmp_path / "bad", eval={**off, "metric": "fidelity_pose_map50_95"}, train={"iterations": 2})
    with pytest.raises(ConfigError, match=r"eval.metric: 'fidelity_pose_map50_95' picks best.pt, but nothing is "
                                          r"evaluated .*eval.metric=null"):
        AutoCompression(cfg).run()
    assert not (tmp_path / "bad" / "last.pt").exists()
    ok = tiny_config(tmp_path / "ok", eval={**off, "metric": None}, train={"iterations": 2},
                     export={"onnx": False}, report={"enabled": False})
    assert AutoCompression(ok).run()["best_iteration"] == 2 and (tmp_path / "ok" / "best.pt").is_file()


def test_cli_runs_compress_with_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path / "out")))
    r = subprocess.run([sys.executable, "-m", "act", "compress", "--config", str(cfg), "train.iterations=2",
                        "export.onnx=false"], capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(tmp_path / "out" / "last.pt")["act"]["iteration"] == 2
    assert "TensorBoard" in r.stdout
