"""The CPU deployment target (export.target: cpu) and OpenVINO, on the real yolo11n-pose teacher (CPU, 320 px):

- the two causes of the broken OpenVINO INT8 model (issue "Deployment that works and pays"), each shown on the graph
  pattern itself and fixed: signed-int8 activations read next to a Concat (OpenVINO requantizes with scale 1), and
  8-bit weights on CPUs without VNNI (u8 x s8 pairs summed into 16 bits saturate; emulated here with oneDNN's
  ONEDNN_MAX_CPU_ISA=AVX2, which is what a CPU without VNNI runs);
- a cpu-target student gives OpenVINO's outputs equal to onnxruntime's and torch's per output branch, its IR in
  Ultralytics' layout loads with YOLO(), `act export --format openvino` writes it, the linter knows the cpu rules;
- the parity check looks per output branch (a dead class branch fails it, naming branch and runtime).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

openvino = pytest.importorskip("openvino")

ROOT = Path(__file__).resolve().parents[1]
DATA_YAML = ROOT / "data" / "coco-pose-mini.yaml"
SHARED = (ROOT / "data" / "../../shared/data/coco-pose-mini").resolve()
IMGSZ = 320


def _pool():
    return str(DATA_YAML) if (SHARED / "images" / "train").is_dir() else "pkg:ultralytics/assets"


def _cfg(out, target="cpu", **sections):
    raw = {
        "model": {"teacher": "yolo11n-pose"},
        "data": {"train": _pool(), "imgsz": IMGSZ, "batch_size": 4, "workers": 0},
        "train": {"device": "cpu", "iterations": 2},
        "eval": {"before": False, "fidelity": {"images": 4}, "batch_size": 4},
        "ptq": {"num_images": 8, "batch_size": 4, "bins": 512, "calibrator": "percentile"},
        "export": {"parity_images": 4, "target": target},
        "report": {"latency_runs": 2},
        "strategy": "ptq",
        "output_dir": str(out),
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    from act.run.ptq import PostTrainingQuantization

    out = tmp_path_factory.mktemp("ov") / "cpu"
    summary = PostTrainingQuantization(_cfg(out)).run()
    return out, summary


# ---- the two causes, on the patterns themselves -----------------------------------------------------------------
def _concat_conv_graph(activation_dtype):
    """Two inputs -> Concat -> activation Q/DQ -> Conv with per-channel int8 weights (a C2f's cv2, a neck Concat)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from act.deploy.onnx_hygiene import activations_as_uint8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32, 1, 1)).astype(np.float32)
    ws = (np.abs(w).reshape(32, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.217, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(32, np.int8), "wz"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")]
    nodes = [helper.make_node("Concat", ["a", "c"], ["cat"], axis=1),
             helper.make_node("QuantizeLinear", ["cat", "s", "z"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["cd", "wd", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16, 20, 20])
                                           for n in ("a", "c")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 20, 20])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if activation_dtype == "uint8":
        activations_as_uint8(proto)
    onnx.checker.check_model(proto)
    return proto


def _ort(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(b, np.float64) - a) / np.linalg.norm(a))


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_signed_int8_activation_after_concat_is_what_openvino_misreads(tmp_path, dtype):
    """Cause 2: OpenVINO reading the ONNX itself (read_model / compile_model on the file) computes a signed-int8
    activation Q/DQ after a Concat with scale 1 (measured 16% off on this graph); the same values stored as uint8 with
    zero point 128 (act.deploy.onnx_hygiene.activations_as_uint8) are exact on every path. (ov.convert_model's
    offline transformations, which make act's IR, read the int8 form right too.)"""
    import onnx

    path = tmp_path / f"{dtype}.onnx"
    onnx.save(_concat_conv_graph(dtype), str(path))
    rng = np.random.default_rng(1)
    feeds = {n: (rng.standard_normal((1, 16, 20, 20)) * 2).astype(np.float32) for n in ("a", "c")}
    ref = _ort(path, feeds)
    got = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    converted = openvino.Core().compile_model(openvino.convert_model(str(path)), "CPU",
                                              {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    assert _rel(ref, converted) < 1e-4
    if dtype == "int8":
        assert _rel(ref, got) > 0.05  # the OpenVINO fault this target works around (documented, not ours to fix)
    else:
        assert _rel(ref, got) < 1e-4


def test_activations_as_uint8_keeps_every_value(tmp_path):
    """The uint8 form computes exactly what the int8 form does in onnxruntime (it is the same grid and bounds)."""
    import onnx

    rng = np.random.default_rng(2)
    feeds = {n: (rng.standard_normal((1, 16, 20, 20)) * 20).astype(np.float32) for n in ("a", "c")}  # saturates too
    outs = []
    for dtype in ("int8", "uint8"):
        onnx.save(_concat_conv_graph(dtype), str(tmp_path / f"{dtype}.onnx"))
        outs.append(_ort(tmp_path / f"{dtype}.onnx", feeds))
    assert np.array_equal(outs[0], outs[1])


def _first_conv(onnx_path, out_path):
    import onnx.utils

    proto = onnx.load(str(onnx_path))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    onnx.utils.extract_model(str(onnx_path), str(out_path), ["images"], [conv.output[0]])
    return out_path


AVX2_CHECK = """
import sys, numpy as np, onnxruntime as ort, openvino as ov
p = sys.argv[1]
x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
a = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
b = ov.Core().compile_model(p, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
print(float(np.linalg.norm(b - a) / np.linalg.norm(a)))
"""


def _avx2_error(model_path):
    """OpenVINO vs onnxruntime on a model, with oneDNN held to AVX2 (no VNNI), in a fresh process."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", AVX2_CHECK, str(model_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_eight_bit_weights_saturate_without_vnni_and_seven_bits_do_not(cpu_run, tmp_path):
    """Cause 1: on AVX2 without VNNI the first conv (image -> Q/DQ -> conv) of a full-range int8 student differs by
    ~70% in OpenVINO; the cpu target's 7-bit weights (quant.weight.range int7) make it exact."""
    from act.blocks.checkpoint import load_checkpoint
    from act.deploy.export import export_onnx
    from act.core.family import family_for

    out, _ = cpu_run
    student = load_checkpoint(out / "ptq.pt")["model"].float().eval()
    family = family_for(student)
    seven = _first_conv(out / "student.onnx", tmp_path / "int7.onnx")
    for m in student.modules():  # the same student with full-range weights (what export.target tensorrt trains)
        if hasattr(m, "max_int"):
            m.max_int = 127
    full = export_onnx(student, tmp_path / "int8_full.onnx", family, IMGSZ, simplify=True, target="cpu")
    eight = _first_conv(full, tmp_path / "int8.onnx")
    assert _avx2_error(eight) > 0.2
    assert _avx2_error(seven) < 1e-3


# ---- a cpu-target run -----------------------------------------------------------------------------------------
def test_cpu_target_student_matches_in_openvino_per_branch(cpu_run):
    out, s = cpu_run
    assert s["settings"]["quant"]["weight"]["range"] == "int7"  # auto -> what the target needs
    ov = s["openvino"]
    assert ov["required"] and ov["path"] == str(out / "student_openvino_model")
    par = ov["parity"]
    assert par["passed"] and set(par["branches"]) == {"box", "cls", "kpt"}
    assert par["branches"]["box"] < 0.05 and par["branches"]["kpt"] < 0.05 and par["branches"]["cls"] < 0.1
    ort_par = s["onnx"]["parity"]
    assert ort_par["passed"] and set(ort_par["branches"]) == {"box", "cls", "kpt"}
    assert s["onnx"]["lint"]["clean"] and s["onnx"]["lint"]["target"] == "cpu"


def test_openvino_equals_onnxruntime_on_real_images(cpu_run):
    """The delivered IR against onnxruntime on the same letterboxed images, per branch (f32 float layers)."""
    from act.deploy import openvino as act_ov
    from act.blocks.data import load_images, resolve_source
    from act.deploy.export import onnx_outputs
    from act.core.family import default_family

    out, _ = cpu_run
    images = load_images(resolve_source(_pool())[:4], IMGSZ, default_family().letterbox)
    ref = onnx_outputs(out / "student.onnx", images)
    got, info = act_ov.outputs(out / "student_openvino_model", images, "f32")
    from act.deploy.export import compare

    res = compare("openvino", ref, got, {"box": slice(0, 4), "cls": slice(4, 5), "kpt": slice(5, None)},
                  {"box": 0.05, "cls": 0.1, "kpt": 0.05})
    assert res["passed"], res["branches"]
    assert ref[:, 4].max() > 0.3 and got[:, 4].max() > 0.3  # the class branch lives (it was 0.004 before the fix)


def test_ir_in_ultralytics_layout_loads_with_yolo(cpu_run):
    from ultralytics import YOLO

    out, _ = cpu_run
    folder = out / "student_openvino_model"
    assert {p.name for p in folder.iterdir()} >= {"student.xml", "student.bin", "metadata.yaml"}
    model = YOLO(str(folder), task="pose")
    res = model.predict(str(Path(__import__("ultralytics").__file__).parent / "assets" / "bus.jpg"), imgsz=IMGSZ,
                        verbose=False)[0]
    assert res.keypoints is not None and len(res.boxes) > 0
    import yaml

    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert meta["task"] == "pose" and meta["kpt_shape"] == [17, 3] and meta["imgsz"] == [IMGSZ, IMGSZ]


def test_summary_has_openvino_latency_of_teacher_and_student(cpu_run):
    _, s = cpu_run
    lat = s["latency"]
    for who in (lat, lat["teacher"]):
        ov = who["openvino_cpu"]
        assert ov["median_ms"] > 0 and ov["hint"] == "LATENCY" and ov["batch"] == 1 and ov["imgsz"] == [IMGSZ, IMGSZ]
        assert ov["throughput_images_per_s"] > 0
        assert who["onnxruntime_cpu"]["median_ms"] > 0
    assert lat["openvino_student_vs_teacher"] > 0


def test_lint_cpu_rules(cpu_run, tmp_path):
    """The cpu target's linter flags int8 activations and 8-bit weights; the tensorrt rules flag uint8."""
    from act.deploy.lint import lint_onnx

    out, _ = cpu_run
    assert lint_onnx(out / "student.onnx").clean  # cpu, from the file's metadata
    trt = lint_onnx(out / "student.onnx", target="tensorrt")
    assert not trt.clean and {f.code for f in trt.errors} == {"zero_point"}
    from act.blocks.checkpoint import load_checkpoint
    from act.deploy.export import export_onnx
    from act.core.family import family_for

    student = load_checkpoint(out / "ptq.pt")["model"].float().eval()
    trt_onnx = export_onnx(student, tmp_path / "trt.onnx", family_for(student), IMGSZ, simplify=True)  # tensorrt
    assert lint_onnx(trt_onnx).clean
    codes = {f.code for f in lint_onnx(trt_onnx, target="cpu").errors}
    assert codes == {"activation_int8"}  # 7-bit weights (this student's), int8 activations
    for m in student.modules():
        if hasattr(m, "max_int"):
            m.max_int = 127
    full = export_onnx(student, tmp_path / "full.onnx", family_for(student), IMGSZ, simplify=True, target="cpu")
    assert {f.code for f in lint_onnx(full).errors} == {"weight_range"}


def test_act_export_format_openvino(cpu_run, tmp_path):
    """`act export RUN --format openvino` (a tensorrt-target run): the IR, checked per branch, in export.json."""
    import shutil

    from act.cli.export_command import export
    from act.run.ptq import PostTrainingQuantization

    out = tmp_path / "trt"
    PostTrainingQuantization(_cfg(out, target="tensorrt", report={"enabled": False},
                                  export={"openvino": {"enabled": False}})).run()
    assert not (out / "student_openvino_model").exists()
    res = export(str(out), formats=["openvino"], log=lambda *a: None)
    assert (out / "student_openvino_model" / "student.xml").is_file()
    assert res["openvino"]["required"] and res["openvino"]["parity"]["runtime"] == "openvino"
    assert json.loads((out / "export.json").read_text())["openvino"]["path"] == str(out / "student_openvino_model")
    # from an ONNX: the IR checked against onnxruntime
    onnx_only = tmp_path / "only"
    onnx_only.mkdir()
    shutil.copy(out / "student.onnx", onnx_only / "student.onnx")
    res = export(str(onnx_only / "student.onnx"), formats=["openvino"], log=lambda *a: None)
    assert res["openvino"]["parity"]["passed"] and (onnx_only / "student_openvino_model" / "metadata.yaml").is_file()


# ---- per-branch parity --------------------------------------------------------------------------------------
def test_dead_class_branch_fails_parity_naming_branch_and_runtime():
    """A class branch that collapses (as it did in OpenVINO: max score 0.78 -> 0.004) is 1 of 56 channels: the whole
    output's relative L2 stays under its 3% bound, the per-branch check fails and says where."""
    from act.core.errors import ParityError
    from act.deploy.export import compare, parity_message

    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 320, (2, 4, 500)), rng.uniform(0, 0.9, (2, 1, 500)) ** 4,
                          rng.uniform(0, 320, (2, 51, 500))], 1).astype(np.float32)
    dead = ref.copy()
    dead[:, 4] *= 0.005
    branches = {"box": slice(0, 4), "cls": slice(4, 5), "kpt": slice(5, None)}
    res = compare("openvino", ref, dead, branches, {"box": 0.05, "cls": 0.1, "kpt": 0.05}, tolerance=0.03)
    assert res["rel_l2"] < 0.03 and not res["passed"] and res["failed_branches"] == ["cls"]
    msg = parity_message(Path("m.onnx"), res)
    assert "openvino" in msg and "cls branch" in msg
    with pytest.raises(ParityError, match="cls branch"):
        raise ParityError(msg)


def test_missing_openvino_is_one_clear_message(monkeypatch, tmp_path):
    from act.cli.export_command import export
    from act.core.optional_deps import OpenVINOMissing

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(OpenVINOMissing, match=r"pip install act\[openvino\]"):
        export(str(tmp_path), formats=["openvino"])
    from act.core.config import load_config

    with pytest.raises(OpenVINOMissing, match="export.openvino.enabled"):
        load_config(raw=_cfg(tmp_path / "x", export={"openvino": {"enabled": True}}))


def test_target_and_range_config():
    from act.core.config import validate_config
    from act.core.errors import ConfigError

    base = _cfg("/tmp/unused")
    assert validate_config(base).quant.weight.range == "int7"
    base["export"]["target"] = "tensorrt"
    assert validate_config(base).quant.weight.range == "int8"
    base["quant"] = {"weight": {"range": "int7"}}
    assert validate_config(base).quant.weight.max_int == 63  # explicit wins
    for bad, where in (({"export": {"target": "gpu"}}, "export.target"),
                       ({"quant": {"weight": {"range": "int6"}}}, "quant.weight.range"),
                       ({"export": {"branch_tolerance": {"score": 0.1}}}, "export.branch_tolerance")):
        raw = _cfg("/tmp/unused")
        for k, v in bad.items():
            raw.setdefault(k, {}).update(v)
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            validate_config(raw)


def test_seven_bit_weight_quantizer():
    from act.blocks.quant.quantizers import WeightQuantizer

    w = torch.randn(8, 4, 3, 3)
    q = WeightQuantizer(per_channel=True, max_int=63).eval()
    s = q.scale(w)
    ints = torch.round(q(w) / s.view(-1, 1, 1, 1))
    assert ints.abs().max() == 63 and torch.allclose(ints.abs().amax(dim=(1, 2, 3)), torch.full((8,), 63.0))
