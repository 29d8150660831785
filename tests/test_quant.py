"""Quantizers: what they compute, how they train, and what they export."""

import io

import onnx
import pytest
import torch
from torch import nn

from act.core.config import QuantConfig
from act.blocks.quant import ActivationQuantizer, QuantConv2d, WeightQuantizer, calibrate, freeze, quantize


def test_weight_quantizer_per_channel_absmax():
    w = torch.randn(8, 4, 3, 3)
    w[3] *= 100  # one loud channel must not coarsen the others
    q = WeightQuantizer(per_channel=True)
    s = q.scale(w)
    assert torch.allclose(s, w.abs().amax(dim=(1, 2, 3)) / 127)
    wq = q(w)
    assert torch.allclose(wq, torch.round(w / s[:, None, None, None]) * s[:, None, None, None], atol=1e-6)
    err = (wq - w).abs().amax(dim=(1, 2, 3))
    assert (err <= s / 2 + 1e-7).all()
    wt = WeightQuantizer(per_channel=False)(w)
    assert (wt - w).abs()[0].max() > err[0]  # per-tensor is coarser on the quiet channels


def test_activation_ema_and_pact():
    q = ActivationQuantizer(ema_rate=0.9, pact=True)
    q.train()
    q.mode = "observe"
    q(torch.full((4,), 2.0))
    assert float(q.running_absmax) == pytest.approx(2.0)  # first batch initialises
    q(torch.full((4,), 4.0))
    assert float(q.running_absmax) == pytest.approx(0.9 * 2 + 0.1 * 4)
    q.init_alpha_from_range()
    assert float(q.alpha) == pytest.approx(2.2)
    q.mode = "quant"
    x = torch.tensor([-10.0, -1.0, 0.5, 10.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    # clipped values give the gradient to alpha (+1 above, -1 below), pass-through ones to x (STE)
    assert float(q.alpha.grad) == pytest.approx(0.0)  # +1 - 1
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert y.abs().max() <= float(q.alpha) + 1e-6


def test_eval_does_not_update_and_matches_frozen():
    q = ActivationQuantizer()
    q.train()
    q(torch.randn(100) * 3)
    q.eval()
    before = q.running_absmax.clone()
    x = torch.randn(1000) * 5
    y = q(x)
    assert torch.equal(before, q.running_absmax)
    q.freeze()
    assert torch.equal(q(x), y)


def test_quantize_replaces_convs_and_skips_patterns():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))
    quantize(model, QuantConfig(skip=["2"]))
    assert isinstance(model[0], QuantConv2d) and type(model[2]) is nn.Conv2d
    assert type(model[4]).__name__ == "QuantLinear"
    calls = []
    calibrate(model, lambda m: calls.append(m(torch.rand(2, 3, 32, 32))))
    assert calls and float(model[0].input_quantizer.alpha) == pytest.approx(float(model[0].input_quantizer.running_absmax))


def test_export_is_pure_qdq():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 3))
    quantize(model, QuantConfig(), forward_loop=lambda m: m(torch.rand(2, 3, 16, 16)))
    freeze(model.eval())
    f = io.BytesIO()
    torch.onnx.export(model, torch.rand(1, 3, 16, 16), f, opset_version=17, dynamo=False)
    g = onnx.load_from_string(f.getvalue()).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4
    assert not {"Abs", "ReduceMax", "Cast", "Min", "Clip"} & set(ops)  # constant scales only
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            zp = n.input[2]
            t = inits[zp] if zp in inits else consts[zp].attribute[0].t
            assert t.data_type == onnx.TensorProto.INT8
