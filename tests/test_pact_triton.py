"""The Triton PACT kernels (act.blocks.quant.pact_triton, the CUDA default of train.compile=quantizers) compute what the
eager quantizer computes, bit for bit: run in Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton
is imported, hence a subprocess); on a CUDA machine the same check also runs compiled on the GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]

CHECK = r'''
import json, sys, torch
from act.blocks.quant import fused, pact_triton
from act.blocks.quant.quantizers import ActivationQuantizer
dev = sys.argv[1]
out = []
for layout in ("contiguous", "channels_last", "chunk", "chunk_channels_last", "mixed_grad"):
    for ratio in (0.5, 2.0):
        torch.manual_seed(3)
        x = torch.randn(2, 6, 9, 11) * 3
        x = x.to(dev)
        q = ActivationQuantizer(ema_rate=0.9, pact=True).train().to(dev)
        q.mode = "observe"; q(x); q.init_alpha_from_range(ratio); q.mode = "quant"
        x.view(-1)[:4] = torch.tensor([1e6, -1e6, 0.0, -0.0], device=dev)  # far outside the range; signed zeros
        # exact ties of the rounding: odd multiples of scale / 2 inside the clip
        x.view(-1)[4:14] = (torch.arange(-5, 5, device=dev) + 0.5) * q.scale()
        if layout in ("channels_last", "mixed_grad"):
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout.startswith("chunk"):  # a channel slice (C2f's split): read through its strides
            fmt = torch.channels_last if layout.endswith("channels_last") else torch.contiguous_format
            big = torch.randn(2, 10, 9, 11, device=dev)
            big[:, 2:8] = x
            x = big.contiguous(memory_format=fmt)[:, 2:8]
        q2 = ActivationQuantizer(ema_rate=0.9, pact=True).train().to(dev)
        q2.load_state_dict(q.state_dict())
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fused.set_enabled(False); y1 = q(x1)
        fused.set_enabled(True); y2 = q2(x2)
        g = torch.randn_like(y1)
        if layout == "mixed_grad":  # the gradient arrives in another layout than x
            g = g.contiguous()
        y1.backward(g); y2.backward(g)
        out.append(dict(layout=layout, ratio=ratio, backend=fused.backend(x2.detach()),
                        out_equal=torch.equal(y1, y2), grad_equal=torch.equal(x1.grad, x2.grad),
                        out_diff=[int((y1 != y2).sum()), float((y1 - y2).abs().max())],
                        grad_diff=[int((x1.grad != x2.grad).sum()), float((x1.grad - x2.grad).abs().max())],
                        first_diff=[[float(x[tuple(i)]), float(y1[tuple(i)]), float(y2[tuple(i)])] for i in
                                    (y1 != y2).nonzero()[:3].tolist()],
                        scale_alpha=[float(q2.scale()), float(q2.alpha.detach())],
                        distinct_codes=int(torch.unique(y2.detach() / q2.scale()).numel()),
                        strided_input=not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last),
                        layout_kept=y2.stride() == y1.stride() or layout.startswith("chunk"),
                        alpha_grad=[float(q.alpha.grad), float(q2.alpha.grad)],
                        ema_equal=torch.equal(q.running_absmax, q2.running_absmax)))
print(json.dumps(out))
'''


def run_check(device: str, interpret: bool):
    env = dict(os.environ, ACT_QUANT_KERNELS="triton", PYTHONPATH=str(REPO))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_same(rows):
    assert len(rows) == 10
    assert sum(r["strided_input"] for r in rows) == 4  # the chunks really are read in place
    for row in rows:
        assert row["backend"] == "triton", row
        assert row["out_equal"] and row["grad_equal"] and row["layout_kept"] and row["ema_equal"], row
        ref, got = row["alpha_grad"]
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), row
        assert row["distinct_codes"] > 100, row  # the values spread over the INT8 grid (not all one code)
        if row["ratio"] < 1:
            assert got != 0.0, row  # clipping below the range trains alpha


def test_triton_kernels_match_eager_quantizer_interpreted():
    assert_same(run_check("cpu", interpret=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_match_eager_quantizer_on_gpu():
    assert_same(run_check("cuda", interpret=False))
