"""Q/DQ placement on the real yolo11n-pose student: quantizers that must share a scale are one module (one
parameter) and stay one through training, pickling and export; the placed model computes what the teacher does."""

import copy
import io

import pytest
import torch

import qdq_helpers as H
from act.blocks import quant as Q
from act.core.errors import ModelError


def test_groups_share_one_quantizer_and_one_parameter():
    _, _, _, st, _ = H.models()
    c2f = st.model[2]  # C3k2: every Concat input, the conv reading the Concat, the Bottleneck's residual input
    members = [c2f.cat_quantizer, c2f.cv2.conv.input_quantizer, c2f.m[0].cv1.conv.input_quantizer,
               c2f.m[0].add_quantizers[0]]
    assert all(m is members[0] for m in members)
    assert len({m.alpha.data_ptr() for m in members}) == 1
    # the neck Concat (layer 15: upsampled P4 + backbone P3) and the convs reading its inputs and output
    neck = [st.model[15].cat_quantizer, st.model[14].input_quantizer, st.model[5].conv.input_quantizer,
            st.model[16].cv1.conv.input_quantizer]
    assert all(m is neck[0] for m in neck)
    # SPPF: MaxPool input/output and all Concat inputs
    assert st.model[9].cat_quantizer is st.model[9].cv2.conv.input_quantizer
    # the residual Add's conv-side input has its own quantizer; the decode has none
    assert c2f.m[0].add_quantizers[1] is not members[0]
    assert not any(isinstance(m, Q.ActivationQuantizer) for m in st.model[-1].dfl.modules())
    # the optimizer sees each shared alpha once
    alphas = [n for n, _ in st.named_parameters() if n.endswith(".alpha")]
    assert len(alphas) == len(Q.activation_quantizers(st)) == st.act_placement["quantizers"]
    assert st.act_placement["quantizers"] < st.act_placement["quantizers_before"]


def test_shared_scale_trains_as_one(monkeypatch):
    from act.blocks.quant.placement import _flat

    _, _, _, placed, images = H.models()
    st = copy.deepcopy(placed).train()
    q = st.model[2].cat_quantizer
    assert q.calls_per_step == 5  # cv1 output (before its chunk), the Bottleneck output, cv2 (reading the Concat),
    # the Bottleneck's cv1 and residual input
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(float(a[0].detach().abs().max())))
    opt = torch.optim.SGD([p for p in st.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        q.alpha.mul_(0.5)  # clip half the range, so that PACT's alpha gets a gradient
    st_alpha0 = float(q.alpha)
    for _ in range(3):
        seen.clear()
        before = float(q.running_absmax)
        alpha = abs(float(q.alpha))
        out = st(images)
        # one moving-average step per forward, with the max over all five calls (PACT-clipped)
        assert len(seen) == 5 and q._pending_calls == 0
        assert float(q.running_absmax) == pytest.approx(0.9 * before + 0.1 * min(max(seen), alpha), rel=1e-5)
        loss = sum(o.float().pow(2).mean() for o in _flat(out))
        opt.zero_grad()
        loss.backward()
        assert q.alpha.grad is not None and q.alpha.grad != 0
        opt.step()
    h.remove()
    assert float(q.alpha) != st_alpha0  # it trained ...
    c2f = st.model[2]
    assert c2f.cv2.conv.input_quantizer is q and c2f.m[0].add_quantizers[0] is q  # ... and is still one module
    # a checkpoint round trip keeps the sharing (and the Quant* block classes unpickle)
    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.model[2].cat_quantizer is back.model[2].cv2.conv.input_quantizer
    assert type(back.model[2]).__name__ == "QuantC3k2"


def test_frozen_export_uses_one_scale_per_group():
    _, _, _, st, _ = H.models()
    from act.deploy.export import _export_copy

    m = _export_copy(st)
    q = m.model[15].cat_quantizer
    assert q.frozen_scale is not None and m.model[5].conv.input_quantizer is q


def test_placement_refuses_blocks_it_does_not_know(monkeypatch):
    """If Ultralytics' block code drifts from act's copy, placement stops instead of changing the model."""
    import families.ultralytics.blocks as B
    from act.run.build import build_student

    teacher, family, cfg, _, _ = H.models()

    def wrong(self, x):  # a C3 forward with the Concat inputs swapped
        q = self.cat_quantizer
        return self.cv3(torch.cat((q(self.cv2(x)), q(self.m(self.cv1(x)))), 1))

    for name in [n for n in vars(B) if n.startswith("Quant")]:  # restored afterwards: later tests unpickle them
        monkeypatch.setattr(B, name, getattr(B, name))
    monkeypatch.setattr(B, "_c3_forward", wrong)
    monkeypatch.setattr(B, "_SWAPPED", {})
    with pytest.raises(ModelError, match="placement changed what the model computes"):
        build_student(teacher, cfg, family)
