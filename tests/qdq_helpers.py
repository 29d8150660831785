"""Shared, cached objects for the Q/DQ placement / lint / TensorRT tests: one placed yolo11n-pose student
(calibrated on the packaged images at 96 px, the recipe's quant.skip) and its exports, built once per session."""

import atexit
import copy
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import tiny_config

IMGSZ = 96
SKIP = ["model.23.cv4.*.2"]  # as configs/yolo11n_pose_qat_mini.yaml
WORK = Path(tempfile.mkdtemp(prefix="act_qdq_"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def models():
    """(teacher, family, config, placed + calibrated student, images)."""
    from act.blocks import quant as Q
    from act.run.build import build_student, load_frozen
    from act.core.config import load_config
    from act.blocks.data import load_images, resolve_source

    cfg = load_config(raw=tiny_config(WORK / "run", quant={"skip": SKIP}))
    teacher, family, _ = load_frozen("yolo11n-pose")
    student = build_student(teacher, cfg, family)
    images = load_images(resolve_source("pkg:ultralytics/assets")[:2], IMGSZ)
    Q.calibrate(student, lambda m: m(images))
    student.eval()
    return teacher, family, cfg, student, images


@functools.lru_cache(maxsize=None)
def exported(simplify: bool = True, dynamic: bool = False) -> Path:
    from act.deploy.export import export_onnx

    _, family, cfg, student, _ = models()
    name = f"student_{'slim' if simplify else 'raw'}{'_dyn' if dynamic else ''}.onnx"
    return export_onnx(student, WORK / name, family, IMGSZ, dynamic=dynamic, simplify=simplify,
                       skip=SKIP + list(family.float_patterns))


def load(simplify: bool = True) -> onnx.ModelProto:
    return onnx.load(str(exported(simplify)))


# ---- planting defects ------------------------------------------------------------------------------------------------
def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def remove_input_qdq(model, conv_name):
    """Feed a conv its float input: bypass the Q/DQ pair in front of it (for this conv only)."""
    prod = producers(model)
    conv = node(model, conv_name)
    dq = prod[conv.input[0]]
    q = prod[dq.input[0]]
    conv.input[0] = q.input[0]
    return model


def scale_dq_input(model, dq_output, factor):
    """Give the DQ producing `dq_output` (and its Q) a scale `factor` times larger, as a new initializer."""
    prod = producers(model)
    dq = prod[dq_output]
    q = prod[dq.input[0]]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    new = numpy_helper.from_array((consts[dq.input[1]] * factor).astype(np.float32), dq.output[0] + "_planted_scale")
    model.graph.initializer.append(new)
    dq.input[1] = q.input[1] = new.name
    return model


def insert_qdq_after(model, tensor, scale=0.05):
    """A Q/DQ pair on `tensor`, between it and all its readers."""
    s = numpy_helper.from_array(np.array(scale, np.float32), tensor + "_pl_s")
    z = numpy_helper.from_array(np.array(0, np.int8), tensor + "_pl_z")
    model.graph.initializer.extend([s, z])
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            if x == tensor:
                n.input[i] = tensor + "_pl_dq"
    q = helper.make_node("QuantizeLinear", [tensor, s.name, z.name], [tensor + "_pl_q"], name=tensor + "/planted_Q")
    dq = helper.make_node("DequantizeLinear", [tensor + "_pl_q", s.name, z.name], [tensor + "_pl_dq"],
                          name=tensor + "/planted_DQ")
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if tensor in n.output) + 1
    nodes[at:at] = [q, dq]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def save(model, name) -> Path:
    path = WORK / name
    onnx.save(model, str(path))
    return path


def fresh_copy():
    return copy.deepcopy(load())
