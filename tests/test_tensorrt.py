"""TensorRT engine building. The real builder runs only where `tensorrt` imports (and a CUDA GPU is present); here
the tests cover the .engine header against Ultralytics' own reader, the builder's choice of documented flags (on a
stand-in `tensorrt` module that records the calls), `act export`, and the message when TensorRT is missing."""

import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest

import qdq_helpers as H
from act.core.config import TensorRTConfig
from act.deploy.tensorrt import build_engine, read_engine_header, write_engine
from act.core.errors import ActError
from conftest import cli_env

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def ultralytics_header(path):
    from ultralytics.nn.backends.base import BaseBackend

    return BaseBackend.engine_header(path)


def test_engine_header_is_what_ultralytics_reads(tmp_path):
    meta = {"task": "pose", "names": {0: "person"}, "kpt_shape": [17, 3], "imgsz": [96, 96], "args": {"int8": True}}
    blob = b"\x00\x01engine-bytes" * 50
    path = write_engine(tmp_path / "m.engine", blob, meta)
    offset, theirs = ultralytics_header(path)
    assert (offset, theirs) == read_engine_header(path)
    assert theirs["task"] == "pose" and theirs["kpt_shape"] == [17, 3] and theirs["names"] == {"0": "person"}
    assert path.read_bytes()[offset:] == blob
    bare = write_engine(tmp_path / "bare.engine", blob, None)
    assert read_engine_header(bare) == ultralytics_header(bare) == (0, {})


# ---- a stand-in `tensorrt` that records what the builder asks for -----------------------------------------------------
def fake_tensorrt(version="10.8.0", strongly=True, dla_cores=0, input_shape=(1, 3, 96, 96)):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls = {"flags": set(), "profiles": [], "pool": {}, "cache_in": None}

    class Enum:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    trt.NetworkDefinitionCreationFlag = Enum(**({"STRONGLY_TYPED": 0} if strongly else {"EXPLICIT_BATCH": 0}))
    trt.BuilderFlag = Enum(INT8="INT8", FP16="FP16", GPU_FALLBACK="GPU_FALLBACK")
    trt.MemoryPoolType = Enum(WORKSPACE="WORKSPACE")
    trt.DeviceType = Enum(DLA="DLA", GPU="GPU")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        name, shape = "images", input_shape

    class Network:
        def get_input(self, i):
            return Tensor()

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["profiles"].append((name, lo, opt, hi))

    class Cache:
        def serialize(self):
            return b"timing-cache-v1"

    class Config:
        default_device_type = "GPU"
        DLA_core = -1

        def set_flag(self, f):
            calls["flags"].add(f)

        def set_memory_pool_limit(self, pool, size):
            calls["pool"][pool] = size

        def add_optimization_profile(self, p):
            pass

        def create_timing_cache(self, blob):
            calls["cache_in"] = bytes(blob)
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return Cache()

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"SERIALIZED-ENGINE"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def test_builder_strongly_typed_static(monkeypatch, tmp_path):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = H.exported()
    rep = build_engine(onnx_path, tmp_path / "s.engine", TensorRTConfig(workspace_gib=2), log=lambda s: None)
    c = trt.calls
    assert c["network_flags"] == 1 << 0 and c["flags"] == set()  # strongly typed, no precision flags
    assert c["profiles"] == [] and rep["profile"] is None  # static ONNX: no profile
    assert c["pool"] == {"WORKSPACE": 2 << 30}
    assert (tmp_path / "timing.cache").read_bytes() == b"timing-cache-v1" and c["cache_in"] == b""
    build_engine(onnx_path, tmp_path / "s.engine", TensorRTConfig(), log=lambda s: None)
    assert c["cache_in"] == b"timing-cache-v1"  # the second build starts from the saved cache
    offset, meta = ultralytics_header(tmp_path / "s.engine")
    assert (tmp_path / "s.engine").read_bytes()[offset:] == b"SERIALIZED-ENGINE"
    assert meta["task"] == "pose" and meta["kpt_shape"] == [17, 3] and meta["imgsz"] == [96, 96]
    assert meta["args"]["int8"] is True and meta["args"]["dynamic"] is False


def test_builder_weakly_typed_dynamic_profile(monkeypatch, tmp_path):
    trt = fake_tensorrt(version="8.6.1", strongly=False, input_shape=(-1, 3, 96, 96))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cfg = TensorRTConfig(min_batch=1, opt_batch=4, max_batch=16, timing_cache=None)
    rep = build_engine(H.exported(dynamic=True), tmp_path / "d.engine", cfg, log=lambda s: None)
    c = trt.calls
    assert c["flags"] == {"INT8", "FP16"} and c["network_flags"] == 1 << 0  # EXPLICIT_BATCH before TensorRT 10
    assert c["profiles"] == [("images", (1, 3, 96, 96), (4, 3, 96, 96), (16, 3, 96, 96))]
    assert rep["strongly_typed"] is False and c["cache_in"] is None
    _, meta = ultralytics_header(tmp_path / "d.engine")
    assert meta["args"]["dynamic"] is True and meta["batch"] == 16
    with pytest.raises(ActError, match="no strongly typed"):
        build_engine(H.exported(), tmp_path / "x.engine", TensorRTConfig(strongly_typed=True), log=lambda s: None)


def test_builder_dla_with_gpu_fallback(monkeypatch, tmp_path):
    trt = fake_tensorrt(dla_cores=2)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build_engine(H.exported(), tmp_path / "a.engine", TensorRTConfig(dla_core=1), log=lambda s: None)
    cfg = trt.calls["config"]
    assert cfg.default_device_type == "DLA" and cfg.DLA_core == 1 and "GPU_FALLBACK" in trt.calls["flags"]
    assert ultralytics_header(tmp_path / "a.engine")[1]["dla"] == "1"  # Ultralytics sets runtime.DLA_core from it
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(dla_cores=0))
    with pytest.raises(ActError, match="DLA cores"):
        build_engine(H.exported(), tmp_path / "b.engine", TensorRTConfig(dla_core=0), log=lambda s: None)


def test_act_export_from_checkpoint(tmp_path):
    from act.blocks.checkpoint import atomic_save, make_checkpoint
    from act.cli.export_command import export

    _, _, cfg, student, _ = H.models()
    atomic_save(make_checkpoint(student, {"config": cfg.dump()}, {"imgsz": H.IMGSZ, "task": "pose"}),
                tmp_path / "best.pt")
    res = export(str(tmp_path), log=lambda s: None)
    assert res["onnx"]["lint"]["clean"] and res["onnx"]["parity"]["passed"]
    assert res["onnx"]["lint"]["info_codes"] == ["float_op", "skipped"]
    assert json.loads((tmp_path / "export.json").read_text())["onnx"]["path"].endswith("student.onnx")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; this checks the message where it is not")
def test_missing_tensorrt_is_a_clear_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "act", "export", str(H.exported()), "--engine"], capture_output=True,
                       text=True, env=cli_env())
    assert r.returncode == 2 and "pip install act[tensorrt]" in r.stderr and "Traceback" not in r.stderr
    from act.core.config import load_config
    from act.deploy.tensorrt import TensorRTMissing
    from conftest import tiny_config

    with pytest.raises(TensorRTMissing):  # export.tensorrt.enabled fails when the config loads, before training
        load_config(raw=tiny_config(tmp_path, export={"tensorrt": {"enabled": True}}))


# ---- the real thing, where TensorRT and a GPU exist ------------------------------------------------------------------
def _real_trt():
    if not HAS_TRT:
        pytest.skip("tensorrt is not installed (pip install act[tensorrt] on a machine with an NVIDIA GPU)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("tensorrt is installed but no CUDA GPU is available to build an engine")


def test_real_engine_builds_and_ultralytics_runs_it(tmp_path, assets_dir):
    _real_trt()
    from ultralytics import YOLO

    from act.deploy.export import onnx_outputs

    _, _, _, _, images = H.models()
    rep = build_engine(H.exported(), tmp_path / "s.engine", TensorRTConfig(workspace_gib=1))
    assert rep["bytes"] > 0
    model = YOLO(str(tmp_path / "s.engine"), task="pose")
    res = model.predict(str(assets_dir / "bus.jpg"), imgsz=H.IMGSZ, verbose=False, conf=0.01)
    assert res[0].keypoints is not None and res[0].keypoints.xy.shape[1:] == (17, 2)
    from ultralytics.nn.autobackend import AutoBackend

    backend = AutoBackend(str(tmp_path / "s.engine"), device=__import__("torch").device("cuda"))
    trt_out = backend(images[:1].cuda())
    trt_out = (trt_out[0] if isinstance(trt_out, (list, tuple)) else trt_out).float().cpu().numpy()
    ort_out = onnx_outputs(H.exported(), images[:1])
    rel = np.linalg.norm(trt_out - ort_out) / np.linalg.norm(ort_out)
    assert rel < 0.1, rel  # INT8 kernels round differently from onnxruntime's emulation, but not by much


def test_real_engine_dynamic_batch(tmp_path):
    _real_trt()
    rep = build_engine(H.exported(dynamic=True), tmp_path / "d.engine",
                       TensorRTConfig(min_batch=1, opt_batch=2, max_batch=4, workspace_gib=1))
    assert rep["profile"] == [[1, 3, 96, 96], [2, 3, 96, 96], [4, 3, 96, 96]]
    assert (tmp_path / "timing.cache").is_file()
