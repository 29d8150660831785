"""The extension points are declared once (act.core.registry) and every registered name works through config and run;
a script's own loader and metric reach every strategy (real yolo11n-pose teacher, CPU, 160 px)."""

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_config


def _round_trip(raw):
    from act.core.config import validate_config

    cfg = validate_config(raw)
    again = validate_config(cfg.dump())
    assert again.dump() == cfg.dump()
    return cfg


def test_every_registered_stage_type_round_trips_through_config_and_its_hooks(tmp_path):
    """Config model and kind come from one registry entry: a stage type the config accepts always has hooks (a
    `distill` stage used to validate and then die with KeyError: 'distill')."""
    from act.core.registry import STAGE_KINDS
    from act.orchestrate.stage_kinds import stage_hooks

    assert {"prune", "quant", "sparsity", "distill"} <= set(STAGE_KINDS.names())
    for name in STAGE_KINDS.names():
        stages = [{"type": name}] if name == "quant" else [{"type": name}, {"type": "quant"}]
        cfg = _round_trip(tiny_config(tmp_path, stages=stages))
        assert type(cfg.stages[0]) is STAGE_KINDS.config(name, None) or name in ("quant",)
        hooks = stage_hooks(cfg.stages, 0)
        assert isinstance(hooks[0], STAGE_KINDS[name])


def test_unknown_stage_type_fails_with_the_key_path_and_the_registered_names(tmp_path):
    from act.core.config import validate_config
    from act.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages\.0\.type: unknown stage type 'distil'; expected one of .*'distill'"):
        validate_config(tiny_config(tmp_path, stages=[{"type": "distil"}, {"type": "quant"}]))
    with pytest.raises(ConfigError, match=r"stages\.0\.targt: unknown key"):
        validate_config(tiny_config(tmp_path, stages=[{"type": "prune", "targt": 0.5}, {"type": "quant"}]))


def test_distill_stage_runs(tmp_path):
    from act import AutoCompression

    cfg = tiny_config(tmp_path, stages=[{"type": "distill", "train": {"iterations": 2}},
                                        {"type": "quant", "train": {"iterations": 2}}],
                      report={"enabled": False}, export={"parity_images": 2, "latency_runs": 0})
    summary = AutoCompression(cfg).run()
    assert [r["stage"]["type"] for r in summary["stages"]] == ["distill", "quant"]
    assert summary["stages"][0]["onnx"]["quantize_linear"] == 0 and summary["stages"][1]["onnx"]["quantize_linear"] > 0


def test_every_registered_loss_and_calibrator_round_trips_and_computes(tmp_path):
    from act.blocks.quant.histograms import amax_from_histogram
    from act.core.registry import CALIBRATORS, LOSSES

    for name in LOSSES.names():
        cfg = _round_trip(tiny_config(tmp_path, distill={"losses": {"kpt": {"type": name}}}))
        assert cfg.distill.losses["kpt"].type == name and isinstance(cfg.distill.losses["kpt"], LOSSES.config(
            name, type(cfg.distill.losses["box"])))
    oks = _round_trip(tiny_config(tmp_path, distill={"losses": {"kpt": {"type": "oks", "visibility_weight": 2}}}))
    assert oks.distill.losses["kpt"].visibility_weight == 2.0
    from act.core.config import validate_config
    from act.core.errors import ConfigError

    old = tiny_config(tmp_path, distill={"losses": {"box": {"type": "soft_label", "axis": "dfl",
                                                            "visibility_weight": 1.0}}})  # a config.yaml of before
    assert "visibility_weight" not in validate_config(old).distill.losses["box"].model_dump()
    with pytest.raises(ConfigError, match=r"distill\.losses\.kpt\.visibility_weight: unknown key"):  # oks's own key
        validate_config(tiny_config(tmp_path, distill={"losses": {"kpt": {"type": "l2", "visibility_weight": 2}}}))
    with pytest.raises(ConfigError, match=r"distill\.losses\.kpt\.type: unknown distillation loss 'l3'"):
        validate_config(tiny_config(tmp_path, distill={"losses": {"kpt": {"type": "l3"}}}))
    hist = np.random.default_rng(0).integers(0, 100, 512)
    for name in CALIBRATORS.names():
        _round_trip(tiny_config(tmp_path, ptq={"calibrator": name}, quant={"calibrator": name}))
        assert 0 < amax_from_histogram(hist, 3.0, name) <= 3.0
    with pytest.raises(ConfigError, match=r"ptq\.calibrator: .*unknown calibrator 'minmaxx'"):
        validate_config(tiny_config(tmp_path, ptq={"calibrator": "minmaxx"}))


class _Loader:
    """A script's own image batches (float in [0, 1]), counted."""

    def __init__(self, size=160):
        self.size, self.drawn = size, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            self.drawn += 1
            yield torch.rand(2, 3, self.size, self.size, generator=g)


def test_script_loader_and_eval_fn_reach_ptq_and_auto(tmp_path):
    """`AutoCompression(cfg, train_loader=..., eval_fn=...)` used to drop both under strategy auto (the default) and
    ptq: the PTQ run and the probe now evaluate with eval_fn, the QAT stage of auto trains on the loader."""
    from act import AutoCompression

    calls = []

    def eval_fn(model, ctx):
        calls.append(ctx.iteration)
        return {"mine": 0.5}

    common = dict(report={"enabled": False}, export={"parity_images": 2, "latency_runs": 0},
                  ptq={"num_images": 2, "batch_size": 2, "bins": 256}, eval={"before": True, "every": 2,
                                                                            "fidelity": {"enabled": False}})
    ptq = AutoCompression(tiny_config(tmp_path / "ptq", strategy="ptq", **copy.deepcopy(common)),
                          train_loader=_Loader(), eval_fn=eval_fn).run()
    assert calls and ptq["metrics"]["best"]["mine"] == 0.5
    calls.clear()
    loader = _Loader()
    auto = AutoCompression(tiny_config(tmp_path / "auto", strategy="auto", train={"iterations": 2},
                                       auto={"target": {"metric": "mine", "min": 0.9},
                                             "qat_target": {"metric": "mine", "min": 0.99},
                                             "search": [{"calibrator": "minmax"}]},
                                       **copy.deepcopy(common)),
                           train_loader=loader, eval_fn=eval_fn).run()
    assert loader.drawn >= 2  # the QAT stage trained on the script's batches
    assert calls and auto["metrics"]["best"]["mine"] == 0.5
