"""`act lint-qdq` and ONNX hygiene on the real yolo11n-pose student (96 px): act's own export lints clean, each
planted defect is found, simplification keeps Q/DQ and onnxruntime parity."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import qdq_helpers as H
from act.deploy.export import onnx_outputs, parity
from act.deploy.lint import lint_onnx, module_path
from conftest import cli_env

HEAD_CONV = "/model.23/cv2.0/cv2.0.2/Conv"  # last conv of the stride-8 box branch


def codes(report):
    return {f.code for f in report.errors}


def test_act_export_lints_clean_with_recipe_skip():
    report = lint_onnx(H.exported())
    assert report.clean, report.text()
    assert report.stats["conv_int8"] == report.stats["conv"] - 3  # the 3 keypoint output convs are float (skip)
    assert report.stats["head_convs"] == 9  # box, cls, keypoint x 3 strides; the DFL conv is decode
    skipped = sorted(f.node for f in report.findings if f.code == "skipped")
    assert skipped == [f"/model.23/cv4.{i}/cv4.{i}.2/Conv" for i in range(3)]
    # without the metadata's skip list those three are real findings
    strict = lint_onnx(H.exported(), skip=[])
    assert codes(strict) == {"conv_input_float", "conv_weight_float"}
    assert len(strict.errors) == 6


def test_module_path_from_onnx_names():
    assert module_path("/model.23/cv3.0/cv3.0.0/cv3.0.0.0/conv/Conv") == "model.23.cv3.0.0.0.conv"
    assert module_path("/model.2/m.0/cv1/conv/Conv") == "model.2.m.0.cv1.conv"


def test_finds_conv_left_unquantized():
    m = H.remove_input_qdq(H.fresh_copy(), "/model.3/conv/Conv")
    r = lint_onnx(m)
    assert [(f.code, f.node) for f in r.errors] == [("conv_input_float", "/model.3/conv/Conv")]


def test_finds_concat_with_mismatched_scales():
    m = H.fresh_copy()
    cat = H.node(m, "/model.15/Concat")
    H.scale_dq_input(m, cat.input[1], 2.0)
    r = lint_onnx(m)
    assert ("concat_scales", "/model.15/Concat") in {(f.code, f.node) for f in r.errors}, r.text()
    # the conv reading a Concat's output with another scale than the Concat's inputs: a requantize too
    m = H.fresh_copy()
    conv = H.node(m, "/model.16/cv1/conv/Conv")
    H.scale_dq_input(m, conv.input[0], 1.5)
    r = lint_onnx(m)
    assert ("concat_scales", "/model.15/Concat") in {(f.code, f.node) for f in r.errors}, r.text()


def test_finds_qdq_in_the_decode():
    m = H.fresh_copy()
    H.insert_qdq_after(m, H.node(m, HEAD_CONV).output[0])
    r = lint_onnx(m)
    assert codes(r) == {"qdq_in_decode"}
    assert len(r.errors) == 2  # the planted Q and DQ


def test_finds_zero_point_and_per_tensor_weight():
    from onnx import numpy_helper

    m = H.fresh_copy()
    prod = H.producers(m)
    conv = H.node(m, "/model.1/conv/Conv")
    wdq = prod[conv.input[1]]
    per_tensor = numpy_helper.from_array(np.array(0.01, np.float32), "planted_scalar_scale")
    zp3 = numpy_helper.from_array(np.array(3, np.int8), "planted_zp")
    m.graph.initializer.extend([per_tensor, zp3])
    wq = prod[wdq.input[0]]
    for n in (wq, wdq):
        n.input[1] = per_tensor.name
        del n.attribute[:]
    xdq = prod[conv.input[0]]
    xdq.input[2] = prod[xdq.input[0]].input[2] = zp3.name
    r = lint_onnx(m)
    assert {"weight_per_tensor", "zero_point"} <= codes(r), r.text()


def test_conv_only_placement_is_not_trt_clean(tmp_path):
    """The old placement (conv inputs only) leaves Concats in float: the linter says so."""
    from act.blocks import quant as Q
    from act.run.build import build_student
    from act.core.config import load_config
    from act.deploy.export import export_onnx
    from conftest import tiny_config

    teacher, family, _, _, images = H.models()
    cfg = load_config(raw=tiny_config(tmp_path, quant={"placement": {"preset": "conv"}}))
    st = build_student(teacher, cfg, family)
    assert st.act_placement["quantizers"] == len(Q.quantized_modules(st))
    Q.calibrate(st, lambda m: m(images))
    r = lint_onnx(export_onnx(st, tmp_path / "conv_only.onnx", family, H.IMGSZ, simplify=True))
    assert "concat_scales" in codes(r) and "add_half_quantized" not in codes(r)


def test_simplified_onnx_keeps_qdq_checker_and_parity():
    from act.deploy.onnx_hygiene import int8_convs

    _, family, cfg, student, images = H.models()
    raw, slim = H.load(simplify=False), H.load()
    onnx.checker.check_model(slim, full_check=True)
    assert int8_convs(slim) == int8_convs(raw) > 90
    assert len(slim.graph.node) < len(raw.graph.node)
    a, b = onnx_outputs(H.exported(False), images), onnx_outputs(H.exported(), images)
    assert np.allclose(a, b, atol=1e-5)
    par = parity(student, H.exported(), family, images, tolerance=cfg.export.parity_tolerance, raise_on_fail=False)
    assert par["passed"], par


def test_dynamic_batch_export_runs_any_batch():
    _, _, _, _, images = H.models()
    path = H.exported(dynamic=True)
    inp = onnx.load(str(path)).graph.input[0]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    both = onnx_outputs(path, images)
    one = onnx_outputs(path, images[:1])
    assert both.shape[0] == 2 and np.allclose(both[:1], one, atol=1e-4)
    assert lint_onnx(path).clean


def test_cli_exit_codes_and_json(tmp_path):
    bad = H.save(H.remove_input_qdq(H.fresh_copy(), "/model.3/conv/Conv"), "planted_cli.onnx")
    run = lambda *a: subprocess.run([sys.executable, "-m", "act", "lint-qdq", *map(str, a)], capture_output=True,
                                    text=True, env=cli_env())
    r = run(H.exported())
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    r = run(bad, "--json")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["error_counts"] == {"conv_input_float": 1}
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    r = run(junk)
    assert r.returncode == 2 and "not a readable ONNX" in r.stderr and "Traceback" not in r.stderr
