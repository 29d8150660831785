"""`act analyze` on the real yolo11n-pose teacher (CPU, 160 px, coco-pose-mini): the ranking, its outputs, that its
top layer left in float helps more than random layers do on images the analysis never saw, and the budget of
`quant.skip: auto`."""

import json
import random
import statistics

import numpy as np
import pytest
from PIL import Image

from conftest import DATA_YAML, SHARED, mini_config

pytestmark = pytest.mark.skipif(not (SHARED / "images" / "val").is_dir(), reason=f"coco-pose-mini not at {SHARED}")

# a layer subset keeps the test fast (the real command measures all ~100): the stem and the head's class and
# keypoint branches (22 convs)
LAYERS = ["model.0.conv", "model.23.cv3.*", "model.23.cv4.*"]


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    from act.orchestrate.analyze import Analysis

    out = tmp_path_factory.mktemp("analyze")
    an = Analysis(mini_config(out, analyze={"images": 8, "layers": LAYERS}))
    res = an.run()
    return an, res, out


def _val_probe(an, n=16):
    """A probe on labeled-split images: never seen by the calibration (train pool) nor the analysis (held-out)."""
    from act.orchestrate.analyze import FidelityProbe
    from act.blocks.data import _from_yaml, load_letterboxed

    images, _ = load_letterboxed(_from_yaml(DATA_YAML, "val")[:n], 160)
    r = an.runner
    return FidelityProbe(r.teacher, an.student, r.nodes, images, r.task, r.device, batch_size=8, fidelity_map=False)


def test_ranking_and_outputs(analysis):
    an, res, out = analysis
    from act.blocks.quant import matches_any, quantized_modules

    expected = [n for n in quantized_modules(an.student) if matches_any(n, LAYERS)]
    assert sorted(r["name"] for r in res.layers) == sorted(expected) and len(expected) >= 20
    gains = [r["gain"] for r in res.layers]
    assert gains == sorted(gains, reverse=True) and [r["rank"] for r in res.layers] == list(range(1, len(gains) + 1))
    assert gains[0] > 0.1  # some layer matters
    assert all("gain_float" in r and "gain_alone" in r for r in res.layers)
    for r in res.layers:  # quantizing a single layer costs less than quantizing all of them
        assert r["alone"]["snr_db"] > res.baseline["int8"]["snr_db"]
    js = json.loads((out / "sensitivity.json").read_text())
    assert [r["name"] for r in js["layers"]] == [r["name"] for r in res.layers] and js["images"] == 8
    md = (out / "sensitivity.md").read_text()
    assert f"| 1 | `{res.layers[0]['name']}` |" in md and md.count("\n| ") == len(res.layers) + 1
    im = np.asarray(Image.open(out / "sensitivity.png").convert("RGB")).astype(float)
    assert im.shape[0] > 300 and im.shape[1] > 600 and im.std() > 5
    # the student is left as it was: every quantizer on, float weights back
    from act.orchestrate.analyze import LayerToggle

    tog = LayerToggle(an.student)
    for n, m in tog.layers.items():
        assert m.input_quantizer.mode == "quant" and m.weight_quantizer.enabled
        assert m.input_quantizer is tog.orig_iq[n]


def test_top_layer_in_float_beats_random_layers_on_unseen_images(analysis):
    from act.orchestrate.analyze import LayerToggle

    an, res, _ = analysis
    probe = _val_probe(an)
    toggle = LayerToggle(an.student)
    names = list(toggle.layers)

    def snr_with_float(layer):
        toggle.set([n for n in names if n != layer])
        try:
            return probe.measure()["fidelity_snr_db_mean"]
        finally:
            toggle.all_on()

    base = probe.measure()["fidelity_snr_db_mean"]
    top = res.layers[0]["name"]
    others = [r["name"] for r in res.layers[1:]]
    rnd = random.Random(0).sample(others, 5)
    top_gain = snr_with_float(top) - base
    rnd_gains = [snr_with_float(n) - base for n in rnd]
    probe.close()
    print("top", top, top_gain, "random", dict(zip(rnd, rnd_gains)))
    assert top_gain > 0 and top_gain > statistics.median(rnd_gains), (top, top_gain, dict(zip(rnd, rnd_gains)))


def test_skip_auto_budget(analysis):
    from act.orchestrate.analyze import FidelityProbe, LayerToggle, choose_skip
    from act.core.config import AutoSkipConfig, TargetConfig

    an, res, _ = analysis
    pick = choose_skip(res, AutoSkipConfig(max_layers=2))
    assert pick["chosen"] == [r["name"] for r in res.layers[:2] if r["gain"] > 0]
    assert choose_skip(res, AutoSkipConfig(max_layers=0))["chosen"] == []
    assert all(n in [r["name"] for r in res.layers if r["gain"] > 0.05]
               for n in choose_skip(res, AutoSkipConfig(max_layers=50, min_gain=0.05))["chosen"])

    images, _ = an._images()
    r = an.runner
    probe = FidelityProbe(r.teacher, an.student, r.nodes, images, r.task, r.device, fidelity_map=False)
    toggle = LayerToggle(an.student)
    calls = []

    def measure(float_layers):
        calls.append(list(float_layers))
        toggle.set([n for n in toggle.layers if n not in float_layers], others=True)
        try:
            return probe.measure()
        finally:
            toggle.all_on()

    base = measure([])["fidelity_snr_db_mean"]
    top = res.layers[0]["name"]
    with_top = measure([top])["fidelity_snr_db_mean"]
    # reachable: exactly what the top layer in float gives -> one layer (none if all-INT8 already gets there)
    t = TargetConfig(metric="fidelity_snr_db_mean", min=with_top - 1e-9)
    got = choose_skip(res, AutoSkipConfig(max_layers=3, target=t), measure)
    assert got["met"] and got["chosen"] == ([top] if with_top > base else [])
    assert got["steps"][-1]["value"] >= t.min
    # unreachable: uses the whole budget, says so
    t = TargetConfig(metric="fidelity_snr_db_mean", min=base + 100)
    got = choose_skip(res, AutoSkipConfig(max_layers=3, target=t), measure)
    assert not got["met"] and len(got["chosen"]) == 3 and "not met" in got["reason"]
    assert calls[-1] == got["chosen"]
    probe.close()


def test_cli_analyze_bad_layer_glob_exits_2(tmp_path, capsys):
    import yaml

    from act.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(mini_config(tmp_path / "out", analyze={"layers": ["model.999.*"]},
                                              ptq={"num_images": 2})))
    assert main(["analyze", "--config", str(cfg)]) == 2
    assert "analyze.layers" in capsys.readouterr().err
