"""`act analyze`: per-layer quantization sensitivity, label-free, and `quant.skip: auto`.

    act analyze --config configs/yolo11n_pose_qat_mini.yaml          # -> sensitivity.md / .json / .png

The student is calibrated once (the `ptq` section's calibrator, on the first images of the pool); then, on a few
held-out images (the label-free fidelity slice) whose teacher outputs are computed once and cached, every quantized
layer (conv/linear with an input and a weight quantizer) is measured twice by switching quantizers on and off:

* alone: only this layer quantized, every other layer in float -> the error this layer causes by itself;
* float: every other layer quantized, this one in float -> what keeping it in float buys (`quant.skip`).

Measures against the teacher (the same as `act.blocks.fidelity`): `fidelity_snr_db_mean` (the mean over the distillation
nodes of each node's SNR in dB, the headline of every eval), `snr_db` = -10 log10(mean over the nodes of
|s - t|^2 / |t|^2) (finite as soon as any node is touched: the 'alone' column), `cos_min` (lowest cosine) and,
with `analyze.fidelity_map`, the detection fidelity mAP (student detections scored against the teacher's). With
`eval.data`, the labeled mAP of the all-INT8 student and of the top `analyze.map_top_k` layers left in float.

The ranking score of a layer is its `gain`: the rise of `analyze.rank_by` (snr_db: fidelity_snr_db_mean, in dB;
fidelity: the detection fidelity mAP) when it alone is left in float. For snr_db the rise is predicted from the
layer's own noise (measured 'alone', the noises of the layers adding up: per node 10 log10(N_all / (N_all - N_layer)));
the directly measured rise ('gain_float', a small difference of two noisy numbers) is reported too but ranks worse on
images the analysis did not see. `quant.skip: auto` keeps the top layers in float within `quant.auto_skip`'s budget.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from act.core.errors import ActError, ConfigError
from act.blocks.fidelity import CachedFidelity, coco_fidelity, node_fidelity
from act.run.hooks import RunHooks
from act.run.ptq import PostTrainingQuantization
from act.orchestrate.sensitivity import RANK_KEYS, SensitivityResult, write_outputs

# ---- the measuring engine -----------------------------------------------------------------------------------------
class LayerToggle:
    """Switch single layers of a fake-quantized model between INT8 and float (eval mode, ranges fixed).

    A layer is a conv/linear with its weight quantizer and its input quantizer. With the TensorRT Q/DQ placement an
    input quantizer may be one module shared by every reader of a tensor, and there are quantizers outside conv
    inputs (Concat, residual Add, Upsample): `set(quantized)` gives a layer whose state differs from the rest a
    private copy of its input quantizer, so that exactly that conv changes. The other quantizers (shared and
    extra) follow the majority: on when at most one layer is float ('float' mode, all on), else off ('alone' mode).

    With `cache_weights=True` each layer's fake-quantized weight is computed once and swapped in while the layer is
    on (the weight quantizer then stays off): the same numbers, less time per forward. `restore()` puts the original
    quantizers and float weights back, every quantizer on."""

    def __init__(self, model: nn.Module, cache_weights: bool = False):
        from act.blocks.quant import activation_quantizers, quantized_modules

        self.layers = quantized_modules(model)
        self.quantizers = list(activation_quantizers(model).values())  # each shared module once
        self.orig_iq = {n: m.input_quantizer for n, m in self.layers.items()}
        self.private = {n: copy.deepcopy(q) for n, q in self.orig_iq.items()}
        self.cached = None
        if cache_weights:
            with torch.no_grad():
                self.cached = {n: (m.weight.data, m.weight_quantizer(m.weight.data).detach().clone())
                               for n, m in self.layers.items()}

    def set(self, quantized: Sequence[str], others: Optional[bool] = None) -> None:
        on = set(quantized)
        if others is None:
            others = len(on) >= len(self.layers) - 1
        for q in self.quantizers:
            q.mode = "quant" if others else "off"
        for name, m in self.layers.items():
            q = name in on
            if q == others:
                m.input_quantizer = self.orig_iq[name]
            else:
                priv = self.private[name]
                priv.mode = "quant" if q else "off"
                m.input_quantizer = priv
            if self.cached is None:
                m.weight_quantizer.enabled = q
            else:
                m.weight_quantizer.enabled = False
                m.weight.data = self.cached[name][1 if q else 0]

    def all_on(self) -> None:
        self.set(list(self.layers))

    def restore(self) -> None:
        if self.cached is not None:
            for name, m in self.layers.items():
                m.weight.data = self.cached[name][0]
        self.cached = None
        self.all_on()


class FidelityProbe(CachedFidelity):
    """Student vs cached teacher outputs on a fixed small image set: node SNR/cosine and detection fidelity mAP
    (act.blocks.fidelity.CachedFidelity, plus the summary keys the analysis ranks by)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, nodes, images: List[np.ndarray], task: str,
                 device: torch.device, batch_size: int = 16, teacher_conf: float = 0.25, fidelity_map: bool = True,
                 family=None):
        if not images:
            raise ActError("analyze: no images to measure on")
        super().__init__(teacher, student, nodes, images, task, device, batch_size, teacher_conf, family)
        self.fidelity_map = fidelity_map

    def measure(self, fidelity_map: Optional[bool] = None) -> Dict[str, float]:
        """The student as it is now (quantizers as toggled) against the teacher: the node measures (act.blocks.fidelity),
        snr_db (of the mean node noise-to-signal ratio), cos_min and, with fidelity_map, the detection fidelity."""
        fidelity_map = self.fidelity_map if fidelity_map is None else fidelity_map
        sums, dts = self.run_student(fidelity_map)
        out = node_fidelity(sums, self.tags)
        nsr = [err / tt for (_, _, tt, err) in sums.values() if tt > 0]
        mean_nsr = float(np.mean(nsr)) if nsr else 0.0
        out["snr_db"] = math.inf if mean_nsr == 0 else -10 * math.log10(mean_nsr)
        out["cos_min"] = out.get("fidelity_cos_min", 1.0)
        if fidelity_map:
            out.update(coco_fidelity(self.gts, dts, self.hw, self.kpt_shape, self.family.oks_sigmas))
            key = "fidelity_pose_map50_95" if self.kpt_shape else "fidelity_box_map50_95"
            out["fidelity_map"] = out.get(key, float("nan"))
        return out


# ---- the analysis -------------------------------------------------------------------------------------------------
def _finite(v: float) -> float:
    return v if math.isfinite(v) else 1e3


def run_sensitivity(teacher: nn.Module, student: nn.Module, nodes, images: List[np.ndarray], task: str,
                    device: torch.device, layers: Sequence[str] = (), rank_by: str = "snr_db",
                    batch_size: int = 16, teacher_conf: float = 0.25, fidelity_map: bool = True,
                    progress: bool = True, family=None) -> SensitivityResult:
    """Rank the quantized layers of a calibrated `student` (all quantizers in 'quant' mode) by sensitivity."""
    from tqdm import tqdm

    from act.blocks.quant import matches_any

    t0 = time.time()
    toggle = LayerToggle(student, cache_weights=True)
    all_names = list(toggle.layers)
    if not all_names:
        raise ActError("analyze: the student has no quantized layers")
    names = [n for n in all_names if matches_any(n, layers)] if layers else all_names
    if not names:
        raise ConfigError(f"invalid config:\n  analyze.layers: {list(layers)} match none of the {len(all_names)} "
                          f"quantized layers (e.g. {all_names[0]})")
    key = RANK_KEYS[rank_by]
    fidelity_map = fidelity_map or key == "fidelity_map"
    probe = FidelityProbe(teacher, student, nodes, images, task, device, batch_size, teacher_conf, fidelity_map,
                          family)
    rows = []
    try:
        toggle.all_on()
        base = probe.measure(fidelity_map=True)
        bar = tqdm(names, desc="act analyze", unit="layer", dynamic_ncols=True,
                   disable=not progress or os.environ.get("ACT_NO_PROGRESS") == "1")
        base_nsr = _node_nsr(base)
        for name in bar:
            toggle.set([name])
            alone = probe.measure()
            toggle.set([n for n in all_names if n != name])
            flt = probe.measure()
            m = toggle.layers[name]
            gain_float = _finite(flt[key]) - _finite(base[key])
            gain_alone = _predicted_gain(base_nsr, _node_nsr(alone))
            # snr_db: the rise predicted from the layer's own noise ranks layers better on unseen images than the
            # measured rise, a small difference of two noisy numbers (rank correlation on held-out images measured
            # on yolo11n-pose: 0.22-0.36 vs 0.13-0.19)
            gain = gain_alone if key == "fidelity_snr_db_mean" else gain_float
            rows.append({
                "name": name,
                "params": int(m.weight.numel()),
                "alone": _slim(alone),
                "float": _slim(flt),
                "gain": gain,
                "gain_float": gain_float,
                "gain_alone": gain_alone,
                "alone_error": -_finite(alone["snr_db"]),
            })
    finally:
        toggle.restore()
        probe.close()
    rows.sort(key=lambda r: (-r["gain"] if math.isfinite(r["gain"]) else math.inf, -r["alone_error"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return SensitivityResult(layers=rows, baseline={"int8": _slim(base)}, rank_by=rank_by, images=len(images),
                             calibrator="", time_s=time.time() - t0,
                             info={"forwards": probe.forwards, "quantized_layers": len(all_names)})


def _node_nsr(m: Dict[str, float]) -> Dict[str, float]:
    """Noise-to-signal power ratio per distillation node, from a measurement's per-node SNRs."""
    return {k: (10 ** (-v / 10) if math.isfinite(v) else 0.0) for k, v in m.items()
            if k.startswith("fidelity/snr_db/")}


def _predicted_gain(base_nsr: Dict[str, float], alone_nsr: Dict[str, float]) -> float:
    """The rise of the mean node SNR (dB) predicted from a layer's own noise (quantized alone), assuming the layers'
    quantization noises add up: per node 10 log10(N_all / (N_all - N_layer)), N_all - N_layer floored at 5% of
    N_all."""
    gains = []
    for k, b in base_nsr.items():
        if b <= 0:
            continue
        rest = max(b - alone_nsr.get(k, 0.0), 0.05 * b)
        gains.append(10 * math.log10(b / rest))
    return float(np.mean(gains)) if gains else 0.0


def _slim(m: Dict[str, float]) -> Dict[str, float]:
    """The summary keys (per-node details stay out of the per-layer rows, except the node SNRs)."""
    return {k: v for k, v in m.items() if "/" not in k or k.startswith("fidelity/snr_db/")}


class Analysis:
    """`Analysis(config).run()` -> SensitivityResult, written to output_dir (sensitivity.md/.json/.png).

    Reuses `act ptq`'s machinery: the teacher, the student quantized like `compress` would (every layer but the
    model family's float layers; the config's own quant.skip is ignored: the ranking is relative to all-INT8), the
    pool less its held-out fidelity slice, and the `ptq` calibrator."""

    def __init__(self, config, overrides: Optional[List[str]] = None):
        runner = PostTrainingQuantization(config, overrides=overrides)
        self.cfg = runner.cfg
        self.out = Path(self.cfg.output_dir)
        self.runner = runner

    def run(self, write: bool = True, writer=None) -> SensitivityResult:
        cfg = self.cfg
        r = self.runner
        # analyze against the all-INT8 student
        r.cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"skip": []})})
        if not r.cfg.quant.enabled:
            raise ConfigError("invalid config:\n  quant.enabled: false, but act analyze quantizes")
        t0 = time.time()
        r.bad_images = []
        r.setup_models()
        images, paths = self._images()
        r.cfg = r.cfg.model_copy(update={"ptq": cfg.ptq.model_copy(
            update={"num_images": cfg.analyze.calib_images or cfg.ptq.num_images})})
        print(f"act analyze: calibrating ({cfg.ptq.calibrator}) on {r.cfg.ptq.num_images} images; measuring on "
              f"{len(images)} held-out images")
        r.calibrate_ptq()
        r.s_capture.remove() if hasattr(r.s_capture, "remove") else None
        a = cfg.analyze
        res = run_sensitivity(r.teacher, r.student, r.nodes, images, r.task, r.device, a.layers, a.rank_by,
                              a.batch_size or cfg.eval.batch_size, cfg.eval.fidelity.teacher_conf, a.fidelity_map,
                              family=r.family)
        res.calibrator = cfg.ptq.calibrator + (f" {cfg.ptq.percentile}" if cfg.ptq.calibrator == "percentile" else "")
        res.info.update({"teacher": str(r.source.path), "imgsz": cfg.data.imgsz, "image_first": str(paths[0])})
        if cfg.eval.data and a.map_top_k:
            self._labeled(res)
        res.time_s = time.time() - t0
        self.student = r.student
        if write:
            paths_out = write_outputs(res, self.out, writer)
            print(f"act analyze: {len(res.layers)} layers ranked in {res.time_s:.0f}s; top: "
                  + ", ".join(f"{x['name']} (+{x['gain']:.2f})" for x in res.layers[:3]))
            print(f"act analyze: wrote {paths_out['md']}, {paths_out['json'].name}, {paths_out['png'].name}")
        return res

    def _images(self):
        from act.blocks.data import load_letterboxed, resolve_source, split_holdout

        cfg = self.cfg
        fid = cfg.eval.fidelity
        if fid.source:
            held = resolve_source(fid.source)
            pool = None
        else:
            pool, held, _ = split_holdout(resolve_source(cfg.data.train), fid.images)
        self.runner.pool = pool
        images, ok = load_letterboxed(held[: cfg.analyze.images], cfg.eval.imgsz or cfg.data.imgsz,
                                      self.runner.family.letterbox)
        if not images:
            raise ActError(f"analyze: none of the held-out images could be read (first: {held[:1]})")
        return images, ok

    def _labeled(self, res: SensitivityResult) -> None:
        """Labeled mAP (eval.data) of the all-INT8 student and of the top-k layers each left in float."""
        from act.blocks.evaluate import CocoEvaluator, EvalContext, default_metric

        r = self.runner
        cfg = self.cfg
        imgsz = cfg.eval.imgsz or cfg.data.imgsz
        ev = CocoEvaluator(cfg.eval.data, r.task, imgsz, cfg.eval.batch_size, cfg.eval.max_images, cfg.eval.split,
                           workdir=self.out / "eval", family=r.family)
        ctx = EvalContext(r.device, imgsz, 0, self.out)
        metric = default_metric(r.task, r.family)
        toggle = LayerToggle(r.student)
        lab = {"teacher": ev(r.teacher, ctx).get(metric)}
        toggle.all_on()
        lab["int8"] = ev(r.student, ctx).get(metric)
        for row in res.layers[: cfg.analyze.map_top_k]:
            toggle.set([n for n in toggle.layers if n != row["name"]])
            row["labeled"] = {"map": ev(r.student, ctx).get(metric)}
        toggle.all_on()
        res.baseline["labeled"] = {f"{k} {metric}": v for k, v in lab.items()}


# ---- quant.skip: auto ---------------------------------------------------------------------------------------------
def choose_skip(res: SensitivityResult, budget, measure=None, teacher_eval: Optional[Dict[str, float]] = None,
                task: str = "pose") -> Dict[str, Any]:
    """Pick the layers to keep in float from a ranking, within `budget` (an AutoSkipConfig).

    Without a target: the top `max_layers` layers whose gain exceeds `min_gain`. With a target: add layers in rank
    order, re-measuring the student with all chosen layers in float (`measure(float_layers) -> metrics`), until the
    target is met or `max_layers` are chosen."""
    from act.core.targets import check_target

    cands = [r for r in res.layers if math.isfinite(r["gain"]) and r["gain"] > budget.min_gain]
    cands = cands[: budget.max_layers]
    steps: List[Dict[str, Any]] = []
    if budget.target is None:
        chosen = [r["name"] for r in cands]
        reason = (f"top {len(chosen)} by gain (budget max_layers={budget.max_layers}, min_gain={budget.min_gain})")
        return {"chosen": chosen, "reason": reason, "budget": budget.model_dump(mode="json"), "steps": steps}
    if measure is None:
        raise ActError("choose_skip with a target needs a measure function")
    chosen: List[str] = []
    met = False
    m = measure([])
    ok, info = check_target(budget.target, m, teacher_eval or {}, task)
    steps.append({"float_layers": [], **info})
    met = ok
    for r in cands:
        if met:
            break
        chosen.append(r["name"])
        m = measure(chosen)
        met, info = check_target(budget.target, m, teacher_eval or {}, task)
        steps.append({"float_layers": list(chosen), **info})
    last = steps[-1]
    reason = (f"target {last['metric']} >= {last['threshold']:.4g} "
              + (f"met with {len(chosen)} layer(s) in float ({last['value']:.4g})" if met else
                 f"not met within the budget of {budget.max_layers} layer(s) (reached {last['value']:.4g})"))
    return {"chosen": chosen, "reason": reason, "met": met, "budget": budget.model_dump(mode="json"), "steps": steps}


class AutoSkip(RunHooks):
    """`quant.skip: auto` as a run hook: before the models are built, the analysis picks the layers to keep in float
    and their names replace 'auto' in the run's config (and its config.yaml)."""

    def configure(self, run) -> None:
        if run.cfg.quant.enabled and run.cfg.quant.skip == "auto":
            resolve_auto_skip(run)


def resolve_auto_skip(runner) -> List[str]:
    """For a run whose config says `quant.skip: auto` (`runner`: its act.run.context.RunContext): analyze, choose
    within quant.auto_skip, write the names into runner.cfg (and the run's config.yaml) and the sensitivity files into
    the run dir. Returns the names.

    On --resume the names of the interrupted run (its last.pt) are kept, so the student has the same layers."""
    import yaml

    from act.blocks.checkpoint import load_checkpoint

    from act.blocks import dist as D

    cfg = runner.cfg
    out = Path(cfg.output_dir)
    if D.env_world() > 1 and not (runner.resuming and (out / "last.pt").is_file()):
        raise ConfigError("invalid config:\n  quant.skip: 'auto' analyzes in one process; under --devices run it "
                          "once without --devices (or `act analyze`) and pass the chosen names")
    decisions = runner.decisions
    if runner.resuming and (out / "last.pt").is_file():
        names = load_checkpoint(out / "last.pt")["act"]["config"]["quant"]["skip"]
        if isinstance(names, list):
            runner.cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"skip": names})})
            return names
    an = Analysis(cfg)
    res = an.run(write=False)
    budget = cfg.quant.auto_skip
    student, toggle = an.student, LayerToggle(an.student)
    probe = None
    if budget.target is not None:
        a = cfg.analyze
        images, _ = an._images()
        probe = FidelityProbe(an.runner.teacher, student, an.runner.nodes, images, an.runner.task, an.runner.device,
                              a.batch_size or cfg.eval.batch_size, cfg.eval.fidelity.teacher_conf, a.fidelity_map,
                              an.runner.family)

    def measure(float_layers):
        toggle.set([n for n in toggle.layers if n not in set(float_layers)], others=True)
        try:
            return probe.measure(fidelity_map=True)
        finally:
            toggle.all_on()

    choice = choose_skip(res, budget, measure if probe else None, task=an.runner.task)
    if probe is not None:
        probe.close()
    res.auto_skip = choice
    write_outputs(res, out)
    names = choice["chosen"]
    runner.cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"skip": names})})
    runner.set_auto_skip({"layers": names, "reason": choice["reason"], "sensitivity": str(out / "sensitivity.json")})
    decisions.append({"stage": "analyze", "decision": f"keep {len(names)} layer(s) in float",
                      "layers": names, "why": choice["reason"],
                      "top_gains": {x["name"]: round(x["gain"], 4) for x in res.layers[:5]},
                      "all_int8": {k: res.baseline["int8"].get(k) for k in ("fidelity_snr_db_mean", "snr_db", "cos_min",
                                                                            "fidelity_map")}})
    print(f"act: decision: quant.skip auto -> {names} ({choice['reason']})")
    if (out / "config.yaml").exists() or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(runner.cfg.dump(), sort_keys=False))
    del an
    return names
