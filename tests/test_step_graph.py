"""train.cuda_graph: the captured step computes what the eager step computes (on a GPU), is re-captured when the
optimizer is replaced, and falls back to the eager step with a message where it cannot run."""

from pathlib import Path

import pytest
import torch
import yaml

from act.core.config import ConfigError, load_config
from act.run.step_graph import unavailable_reason, update_on_device
from act.run.trainer import Trainer
from tests.conftest import tiny_config

CUDA = torch.cuda.is_available()


def test_unavailable_reasons():
    cuda = torch.device("cuda")
    assert unavailable_reason(cuda, False, False, "none") is None
    assert unavailable_reason(cuda, False, False, "bf16") is None
    assert "CUDA" in unavailable_reason(torch.device("cpu"), False, False, "none")
    assert "DDP" in unavailable_reason(cuda, True, False, "none")
    assert "compile" in unavailable_reason(cuda, False, True, "none")
    assert "fp16" in unavailable_reason(cuda, False, False, "fp16")


def test_config_validates(tmp_path):
    train = load_config(raw=tiny_config(tmp_path)).train
    assert (train.cuda_graph, train.compile, train.channels_last) == ("auto", "auto", "auto")  # the fast path
    for bad in ({"compile": "student"}, {"channels_last": "nhwc"}):
        with pytest.raises(ConfigError, match="train." + next(iter(bad))):
            load_config(raw=tiny_config(tmp_path, train=bad))
    with pytest.raises(ConfigError, match="train.cuda_graph"):
        load_config(raw=tiny_config(tmp_path, train={"cuda_graph": "sometimes"}))
    with pytest.raises(ConfigError, match="train.cuda_graph_warmup"):
        load_config(raw=tiny_config(tmp_path, train={"cuda_graph_warmup": 0}))


@pytest.mark.parametrize("asked", [True, None])  # None: the default (auto)
def test_cpu_asked_for_graph_runs_eagerly_and_says_so(tmp_path, capsys, monkeypatch, asked):
    from act.run import step_graph
    from act.blocks.quant import fused

    monkeypatch.setattr(step_graph, "_SAID", set())  # (said once per process)
    train = {"iterations": 2} if asked is None else {"iterations": 2, "cuda_graph": asked}
    t = Trainer(tiny_config(tmp_path, train=train, export={"onnx": False},
                            eval={"before": False, "fidelity": {"enabled": False}}))
    summary = t.run()
    assert t.step_graph is None and not t.channels_last and not fused.ENABLED  # the CPU default: all eager
    assert "train.cuda_graph: the step runs eagerly: it needs a CUDA device" in capsys.readouterr().out
    assert summary["iterations"] == 2 and all(torch.isfinite(torch.tensor(t.loss_history)))


def _cpu_trainer(tmp_path, name, grad_clip):
    """A CPU trainer with what the CUDA step has: a fused AdamW (it takes found_inf) and a GradScaler at scale 1."""
    torch.manual_seed(0)
    t = Trainer(tiny_config(tmp_path / name, train={"grad_clip": grad_clip, "lr": 1e-3},
                            export={"onnx": False}, eval={"before": False, "fidelity": {"enabled": False}}))
    t.setup()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8, generator=g) for _ in range(2)]
    t.calibrate(iter(batches))
    t.student.train()
    t.optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "lr", "weight_decay")}
                                     for g in t.optimizer.param_groups], fused=True)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2**30)
    return t, batches


@pytest.mark.parametrize("grad_clip", [None, 1e-3])  # 1e-3: every step clipped
def test_update_the_graph_records_matches_the_eager_update(tmp_path, grad_clip):
    """update_on_device (backward, clip, non-finite check, step: what the CUDA graph records) moves the weights as
    the eager step does (GradScaler at scale 1), the gradient clip included; a non-finite loss moves nothing."""
    eager, batches = _cpu_trainer(tmp_path, "eager", grad_clip)
    device, _ = _cpu_trainer(tmp_path, "device", grad_clip)
    found_inf, one = torch.zeros(()), torch.ones(())
    params = [p for p in device.student.parameters() if p.requires_grad]
    for i in range(3):
        eager._eager_update(batches[i % 2])
        loss, _ = device.forward_loss(batches[i % 2])
        device.optimizer.zero_grad(set_to_none=True)
        update_on_device(loss, params, device.optimizer, grad_clip, found_inf, one)
        assert float(found_inf) == 0.0
    for (n, a), b in zip(eager.student.state_dict().items(), device.student.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), n
    moved = [n for (n, a), b in zip(_cpu_trainer(tmp_path, "start", grad_clip)[0].student.state_dict().items(),
                                    device.student.state_dict().values()) if not torch.equal(a, b)]
    assert moved  # (the comparison above is not between two untrained students)
    before = {n: p.detach().clone() for n, p in device.student.named_parameters()}
    loss, _ = device.forward_loss(batches[0])
    device.optimizer.zero_grad(set_to_none=True)
    update_on_device(loss * float("nan"), params, device.optimizer, grad_clip, found_inf, one)
    assert float(found_inf) == 1.0
    assert all(torch.equal(p, before[n]) for n, p in device.student.named_parameters())


def _trainer(tmp_path, name, graph, **sections):
    cfg = tiny_config(tmp_path / name, train={"device": "cuda", "iterations": 100, "cuda_graph": graph,
                                              "cuda_graph_warmup": 2, "lr": 1e-4},
                      export={"onnx": False}, eval={"before": False, "fidelity": {"enabled": False}}, **sections)
    torch.manual_seed(0)
    t = Trainer(cfg)
    t.setup()
    torch.backends.cudnn.benchmark = False  # the same convolution algorithms in every run: comparable numbers
    torch.backends.cudnn.deterministic = True
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8, generator=g) for _ in range(3)]
    t.calibrate(iter(batches[:2]))
    t.student.train()
    return t, batches


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_captured_step_matches_eager(tmp_path):
    """Two eager runs and a captured one from the same state on the same batches: the captured run's losses and
    weights differ from the first eager run's no more than the second eager run's do (plus rounding)."""
    eager, batches = _trainer(tmp_path, "eager", False)
    eager2, _ = _trainer(tmp_path, "eager2", False)
    graphed, _ = _trainer(tmp_path, "graph", True)
    assert eager.step_graph is None and graphed.step_graph is not None
    steps = 8
    le, le2, lg = [], [], []
    for i in range(steps):
        se = eager.train_step(batches[i % 3])
        le2.append(float(eager2.train_step(batches[i % 3])["loss"]))
        sg = graphed.train_step(batches[i % 3])
        assert set(se) == set(sg) and len(sg) > 1  # the loss and each node's
        le.append(float(se["loss"]))
        lg.append(float(sg["loss"]))
    info = graphed.step_graph.info()
    assert info["failed"] is None, info
    assert info["captures"] == 1 and info["replays"] == steps - 2
    le, le2, lg = torch.tensor(le), torch.tensor(le2), torch.tensor(lg)
    noise = (le2 - le).abs()
    assert ((lg - le).abs() <= 2 * noise + 1e-4 * le.abs() + 1e-6).all(), (le, le2, lg)
    for (n, a), b, c in zip(eager.student.state_dict().items(), eager2.student.state_dict().values(),
                            graphed.student.state_dict().values()):
        if a.is_floating_point():
            assert ((c - a).abs() <= 2 * (b - a).abs().max() + 1e-4 * a.abs() + 1e-6).all(), n
    assert eager.scheduler.get_last_lr() == graphed.scheduler.get_last_lr()
    # the captured optimizer follows the schedule: the last replay read the last step's lr from the param group
    last = graphed.cfg.train.lr * graphed.lr_factor(steps - 1)
    assert float(graphed.step_graph._lrs[0]) == pytest.approx(last, rel=1e-6)
    assert graphed.optimizer.param_groups[0]["lr"] == pytest.approx(graphed.cfg.train.lr * graphed.lr_factor(steps))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_the_prune_recipe_losses_are_captured(tmp_path):
    """The prune recipe's distillation (OKS keypoints weighted by the teacher's score, block features) copies nothing
    from the host inside the step, so the step is captured (it once ran eagerly: the OKS sigmas came from the CPU)."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs/yolo11n_pose_prune_qat.yaml").read_text())
    t, batches = _trainer(tmp_path, "oks", True, distill=recipe["distill"])
    for i in range(4):
        t.train_step(batches[i % 3])
    info = t.step_graph.info()
    assert info["failed"] is None and info["captures"] == 1, info


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_new_optimizer_recaptures_and_nonfinite_step_is_skipped(tmp_path):
    t, batches = _trainer(tmp_path, "re", True)
    for i in range(4):
        t.train_step(batches[i % 3])
    first = t.step_graph
    assert first.info()["captures"] == 1
    t.setup_optimizer()  # what a pruning step does: a fresh optimizer, so a fresh graph after its warmup
    assert t.step_graph is not first
    for i in range(4):
        t.train_step(batches[i % 3])
    assert t.step_graph.info()["captures"] == 1 and t.step_graph.info()["replays"] == 2
    # a non-finite loss inside a replay: the update is skipped on the device and counted
    before = {k: v.clone() for k, v in t.student.state_dict().items()}
    # (a bias of a distilled head conv: its output reaches the loss with no quantizer between, and a fake-quant
    # saturates NaN to its range like QuantizeLinear does, so a NaN earlier in the network is no NaN in the loss)
    name = t.nodes[0].name + ".bias"
    p = dict(t.student.named_parameters())[name]
    with torch.no_grad():
        saved = p.clone()
        p.fill_(float("nan"))
    t.train_step(batches[0])
    with torch.no_grad():
        p.copy_(saved)
    assert int(t._nonfinite_dev) == 1
    for n, v in t.student.named_parameters():
        if n != name:
            assert torch.equal(v, before[n]), n
