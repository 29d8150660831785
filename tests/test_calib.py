"""PTQ calibrators (act.blocks.quant.histograms) on synthetic histograms and a tiny quantized net: no data, no teacher."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from act.blocks import quant as Q
from act.core.errors import ActError
from act.blocks.quant.histograms import amax_from_histogram, calibrate_ranges, get_ranges, set_ranges


def _gauss_hist(bins=512, outliers=20, seed=0):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal(200_000))
    x[:outliers] = 25.0
    top = float(x.max())
    h, _ = np.histogram(x, bins=bins, range=(0, top))
    return h, top


def _entropy_reference(hist, top, nbins=128, start=128):
    """Model Optimizer's / TensorRT's loop, written out literally (digitize + Counter), to check the vectorised one."""
    edges = np.linspace(0, top, len(hist) + 1)
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divs, args = [], []
    for i in range(start, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        dig = np.digitize(range(i), space) - 1
        dig[bins[:i] == 0] = -1
        dens = np.zeros(nbins)
        for idx, d in enumerate(dig):
            if d != -1:
                dens[d] += bins[idx]
        for key, val in Counter(dig).items():
            if key != -1:
                dens[key] /= val
        new = np.array([dens[d] if d != -1 else 0.0 for d in dig])
        ref = bins[:i].copy()
        ref[-1] += bins[i:].sum()
        p, q = ref / ref.sum(), new / new.sum()
        m = p > 0
        kl = np.inf if np.any(q[m] == 0) else float(np.sum(p[m] * np.log(p[m] / q[m])))
        divs.append(kl)
        args.append(i)
    divs = np.array(divs)
    last = len(divs) - 1 - int(np.argmin(divs[::-1]))
    return edges[args[last]]


def test_calibrators_order_on_outliers():
    h, top = _gauss_hist(bins=2048, outliers=5)
    r = {m: amax_from_histogram(h, top, m, percentile=99.9) for m in ("minmax", "percentile", "mse", "entropy")}
    assert r["minmax"] == pytest.approx(top)
    # a Gaussian body with a few far outliers: every histogram calibrator clips them
    for m in ("percentile", "mse", "entropy"):
        assert 1.0 < r[m] < top, (m, r)
    assert r["percentile"] < amax_from_histogram(h, top, "percentile", percentile=99.999)


def test_entropy_matches_reference_loop():
    for seed in range(3):
        h, top = _gauss_hist(bins=300, outliers=5 + 20 * seed, seed=seed)
        h[150:160] = 0  # empty bins exercise the zero handling
        assert amax_from_histogram(h, top, "entropy") == pytest.approx(_entropy_reference(h, top))


def test_mse_is_the_minimum_of_the_quantization_error():
    h, top = _gauss_hist(bins=512)
    edges = np.linspace(0, top, 513)
    centers = (edges[1:] + edges[:-1]) / 2

    def err(c):
        s = c / 127
        return float((((np.minimum(np.round(centers / s), 127) * s) - centers) ** 2 * h).sum())

    best = amax_from_histogram(h, top, "mse")
    assert all(err(best) <= err(c) + 1e-9 for c in edges[128::7])


def test_degenerate_histograms():
    assert amax_from_histogram(np.zeros(256), 0.0, "entropy") == 0.0
    assert amax_from_histogram(np.zeros(256), 3.0, "mse") == 3.0
    with pytest.raises(ActError, match="unknown calibrator"):
        amax_from_histogram(np.ones(256), 1.0, "kl")


def _tiny_quantized():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    return Q.quantize(net)


def test_calibrate_ranges_sets_moving_average_and_alpha():
    net = _tiny_quantized()
    xs = [torch.randn(2, 3, 8, 8) * (i + 1) for i in range(3)]
    xs[1][0, 0, 0, 0] = 40.0  # one outlier in the input of the first conv

    def loop(m):
        for x in xs:
            m(x)

    mm = calibrate_ranges(net, loop, "minmax")
    assert mm.ranges["0.input_quantizer"] == pytest.approx(40.0)
    # calibration observes float activations and leaves the quantizer state alone
    assert all(float(q.running_absmax) == 0 for q in Q.activation_quantizers(net).values())
    pc = calibrate_ranges(net, loop, "percentile", percentile=99.0, bins=256)
    assert pc.ranges["0.input_quantizer"] < mm.ranges["0.input_quantizer"]
    assert set(pc.ranges) == set(Q.activation_quantizers(net)) == {"0.input_quantizer", "2.input_quantizer"}
    set_ranges(net, pc.ranges)
    for name, q in Q.activation_quantizers(net).items():
        assert float(q.running_absmax) == pytest.approx(pc.ranges[name])
        assert float(q.alpha.detach()) == pytest.approx(pc.ranges[name])
        assert bool(q.alpha_set) and bool(q.initialized) and q.mode == "quant"
    assert get_ranges(net) == pytest.approx(pc.ranges)
    with pytest.raises(ActError, match="do not fit"):
        set_ranges(net, {"0.input_quantizer": 1.0})
