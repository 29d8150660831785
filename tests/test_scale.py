"""Speed paths of the quantizers compute exactly what the plain torch ops compute; the sample stream shards and
resumes independently of the number of ranks; the speed knobs validate."""

import pytest
import torch

from act.core.config import ConfigError, load_config
from act.blocks.pipeline import StreamSampler, resolve_workers
from act.blocks.quant.quantizers import QMAX, QMIN, ActivationQuantizer, WeightQuantizer


def test_weight_training_path_matches_torch_op():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    with torch.no_grad():
        w[2] *= 50
        w[5] = 0  # an all-zero channel (scale clamped to EPS)
    q = WeightQuantizer(per_channel=True).train()
    y = q(w)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    s = q.scale(w)
    w2 = w.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(w2, s, torch.zeros(16, dtype=torch.int32), 0, QMIN, QMAX)
    (ref * g).sum().backward()
    assert torch.equal(y, ref)
    assert torch.equal(w.grad, w2.grad)
    assert torch.equal(q.eval()(w), ref)  # eval / export keep the torch op


@pytest.mark.parametrize("ratio", [0.5, 0.999, 1.004, 2.0])  # (exact ties |x| == alpha: autograd splits
# the gradient half-half, the fused path gives it to x; a measure-zero set)
def test_pact_fused_path_matches_composite(ratio):
    """clamp + fake_quantize through autograd vs the fused function: same output, same x and alpha gradients."""
    torch.manual_seed(1)
    x = (torch.randn(4, 8, 16, 16) * 3).requires_grad_(True)
    q = ActivationQuantizer(ema_rate=0.9, pact=True).train()
    q.mode = "observe"
    q(x.detach())
    q.init_alpha_from_range(ratio)
    q.mode = "quant"
    ref_q = ActivationQuantizer(ema_rate=0.9, pact=True).train()
    ref_q.load_state_dict(q.state_dict())
    # reference: the composite the fused path replaces
    x2 = x.detach().clone().requires_grad_(True)
    a = ref_q.alpha.abs()
    xc = torch.clamp(x2, -a, a)
    ref_q._observe(xc)
    ref = torch.fake_quantize_per_tensor_affine(xc, ref_q.scale(), torch.zeros((), dtype=torch.int32), QMIN, QMAX)
    y = q(x)
    assert torch.equal(y, ref)
    assert torch.equal(q.running_absmax, ref_q.running_absmax)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.allclose(q.alpha.grad, ref_q.alpha.grad, rtol=1e-5, atol=1e-6)
    assert (ratio >= 1.0 or float(q.alpha.grad) != 0.0)  # clipping below the range trains alpha


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stream_sampler_shards_and_resumes_on_any_world_size(world):
    n, b = 10, 2
    ref = StreamSampler(n, b, 0, 1, seed=3)
    it = iter(ref)
    stream = [next(it) for _ in range(60)]
    # each pass over the stream is a permutation of the pool
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    its = [iter(StreamSampler(n, b, r, world, seed=3)) for r in range(world)]
    got = []
    for _ in range(4):  # global batches: rank r takes the r-th slice
        for r in range(world):
            got += [next(its[r]) for _ in range(b)]
    assert got == stream[: 4 * b * world]
    # resume at a sample position written by a run of another world size
    pos = 4 * b * world
    resumed = iter(StreamSampler(n, b * world, 0, 1, seed=3, start=pos))
    assert [next(resumed) for _ in range(b * world)] == stream[pos: pos + b * world]


def test_speed_knobs_validate(tmp_path):
    base = {"model": {"teacher": "yolo11n-pose"}, "data": {"train": "pkg:ultralytics/assets"},
            "output_dir": str(tmp_path)}
    cfg = load_config(raw=base, overrides=["data.cache=ram", "data.workers=auto", "train.channels_last=true",
                                           "train.teacher_amp=bf16", "train.compile=false"])
    assert cfg.data.cache_ram and cfg.train.teacher_amp == "bf16"
    assert resolve_workers("auto") >= 0 and resolve_workers(3) == 3
    for bad, key in (("data.workers=-1", "data.workers"), ("data.cache=disk", "data.cache"),
                     ("data.prefetch_factor=0", "data.prefetch_factor"), ("train.teacher_amp=fp8", "train.teacher_amp")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(raw=base, overrides=[bad])


def test_compiled_quantizer_kernels_match_eager():
    """train.compile=quantizers: the Inductor-built PACT fake-quant gives the eager path's outputs and gradients."""
    from act.blocks.quant import fused

    try:
        for ratio in (0.5, 2.0):
            torch.manual_seed(2)
            x = torch.randn(2, 4, 12, 12) * 3
            q = ActivationQuantizer(ema_rate=0.9, pact=True).train()
            q.mode = "observe"
            q(x)
            q.init_alpha_from_range(ratio)
            q.mode = "quant"
            q2 = ActivationQuantizer(ema_rate=0.9, pact=True).train()
            q2.load_state_dict(q.state_dict())
            x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            fused.set_enabled(False)
            y1 = q(x1)
            fused.set_enabled(True)
            y2 = q2(x2)
            g = torch.randn_like(y1)
            (y1 * g).sum().backward()
            (y2 * g).sum().backward()
            assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
            assert torch.allclose(q.alpha.grad, q2.alpha.grad, rtol=1e-5, atol=1e-6)
            assert ratio > 1 or float(q2.alpha.grad) != 0.0
    finally:
        fused.set_enabled(False)
