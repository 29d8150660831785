"""The calibrators: how a histogram of |x| (counts in equal bins over [0, abs-max]) becomes a clip (the quantizer's
range). The same four as TensorRT / Model Optimizer:

  minmax      the abs-max over all images (one pass, no histogram)
  percentile  that percentile of |x|
  mse         the clip that minimises the expected squared quantization error of the histogram
  entropy     TensorRT's KL-divergence calibration (the clip whose 128-level quantized histogram is closest to the
              clipped reference distribution)

Each is registered once, here, in the core's `CALIBRATORS` registry (act.core.registry): the config's
`ptq.calibrator` / `quant.calibrator` / `auto.search` accept exactly its names, and a new calibrator is a function
`(hist, edges, percentile) -> clip` plus one `CALIBRATORS.add` line.
"""

from __future__ import annotations

import numpy as np

from act.core.errors import ActError
from act.core.registry import CALIBRATORS

NUM_LEVELS = 128  # |x| of a symmetric int8 tensor takes 128 magnitudes (0..127; -128 is never produced by |x|)
START_BIN = 128  # mse / entropy search clips from bin 128 on, as TensorRT and Model Optimizer do


def _percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float = 99.99) -> float:
    """The upper edge of the bin where the cumulative share of |x| reaches `percentile`."""
    cdf = np.cumsum(hist) / hist.sum()
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return edges[min(idx + 1, len(hist))]


def _mse_amax(hist: np.ndarray, edges: np.ndarray, percentile: float = 99.99) -> float:
    """argmin over clips c = edges[i] (i >= 128) of sum_bins count * (center - fakequant(center; c))^2."""
    centers = (edges[:-1] + edges[1:]) / 2
    cands = edges[min(START_BIN, len(hist)):]
    scale = cands[:, None] / (NUM_LEVELS - 1)
    q = np.minimum(np.round(centers[None, :] / scale), NUM_LEVELS - 1) * scale
    err = ((q - centers[None, :]) ** 2 * hist[None, :]).sum(axis=1)
    return cands[int(np.argmin(err))]


def _entropy_amax(hist: np.ndarray, edges: np.ndarray, percentile: float = 99.99, stride: int = 1) -> float:
    """TensorRT's entropy calibration (as in Model Optimizer's HistogramCalibrator): for each candidate clip bin i,
    the reference p is hist[:i] with the outliers added to its last bin; the candidate q merges hist[:i] into 128
    levels and spreads each level's mass evenly over its non-empty bins. The clip minimises KL(p || q); ties go to
    the larger clip."""
    bins = hist.copy()
    if len(bins) > 1:
        bins[0] = bins[1]  # the spike of exact zeros (after ReLU-like layers) would dominate otherwise
    best_i, best_kl = len(bins), np.inf
    for i in range(min(START_BIN, len(bins)), len(bins) + 1, stride):
        head = bins[:i]
        p = head.copy()
        p[-1] += bins[i:].sum()
        level = (np.arange(i) * NUM_LEVELS) // i
        nz = head != 0
        mass = np.bincount(level[nz], weights=head[nz], minlength=NUM_LEVELS)
        count = np.bincount(level[nz], minlength=NUM_LEVELS)
        q = np.where(nz, mass[level] / np.maximum(count[level], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        p, q = p / ps, q / qs
        m = p > 0
        if np.any(q[m] == 0):
            continue  # infinite divergence
        kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl <= best_kl:
            best_kl, best_i = kl, i
    return edges[best_i]


# name -> clip function of (hist, edges, percentile); None: the abs-max itself (no histogram needed)
CALIBRATORS.add("minmax", None)
CALIBRATORS.add("percentile", _percentile_amax)
CALIBRATORS.add("mse", _mse_amax)
CALIBRATORS.add("entropy", _entropy_amax)


def amax_from_histogram(hist: np.ndarray, top: float, method: str, percentile: float = 99.99) -> float:
    """The clip for one quantizer. hist: counts of |x| in len(hist) equal bins over [0, top]."""
    if method not in CALIBRATORS:
        raise ActError(f"unknown calibrator {method!r}; expected one of {', '.join(CALIBRATORS)}")
    hist = np.asarray(hist, dtype=np.float64)
    clip = CALIBRATORS[method]
    if clip is None or top <= 0 or hist.sum() <= 0:
        return float(top)
    return float(clip(hist, np.linspace(0.0, top, len(hist) + 1), percentile))
