"""`act export RUN_DIR|best.pt|student.onnx [--engine] [--format openvino] [--dynamic]`: the deployable files of a
finished run.

From a run folder (its best.pt, else ptq.pt, and its config.yaml) or an act checkpoint: the Q/DQ ONNX for the run's
export.target (simplified, onnx.checker full check, onnxruntime parity per output branch, Q/DQ lint), with --engine
the TensorRT engine next to it, with --format openvino the OpenVINO IR (`<stem>_openvino_model/`, checked against the
torch student per branch). From a Q/DQ .onnx: the engine and/or the IR (checked against onnxruntime). Settings: the
run's `export` section, then key=value overrides (e.g. export.tensorrt.max_batch=16), then the flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from act.core.config import RunConfig, apply_overrides, read_yaml, validate_config
from act.core.errors import ActError, ConfigError

CHECKPOINTS = ("best.pt", "ptq.pt", "last.pt")


def _run_config(folder: Path, overrides: List[str]) -> Optional[RunConfig]:
    raw: Dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        raw = read_yaml(folder / "config.yaml")
    if not raw and not overrides:
        return None
    raw = apply_overrides(raw, overrides)
    if "model" not in raw or "data" not in raw:  # overrides alone: only the export section matters here
        raw.setdefault("model", {"teacher": "none"})
        raw.setdefault("data", {"train": "none"})
    return validate_config(raw)


def resolve_source(source: str):
    """(kind, path, folder): kind 'checkpoint' or 'onnx'."""
    p = Path(source).expanduser()
    if p.is_dir():
        for name in CHECKPOINTS:
            if (p / name).is_file():
                return "checkpoint", p / name, p
        raise ActError(f"{p} holds no act checkpoint ({', '.join(CHECKPOINTS)}); is it an act run folder?")
    if not p.is_file():
        raise ActError(f"not found: {source}")
    if p.suffix == ".onnx":
        return "onnx", p, p.parent
    if p.suffix in (".pt", ".pth"):
        return "checkpoint", p, p.parent
    raise ActError(f"{source}: expected an act run folder, an act checkpoint (.pt) or a Q/DQ .onnx")


def export(source: str, engine: bool = False, dynamic: Optional[bool] = None, batch: Optional[int] = None,
           imgsz: Optional[int] = None, out: Optional[str] = None, overrides: Optional[List[str]] = None,
           formats: Sequence[str] = (), log=print) -> Dict[str, Any]:
    """See the module doc. formats: extra formats to write ('openvino'). Returns what it wrote and checked (also
    written to <folder>/export.json)."""
    from act.core.config import ExportConfig

    if engine:
        from act.deploy.tensorrt import import_tensorrt

        import_tensorrt()  # before any work: a missing TensorRT is an exit-2 message, not a late failure
    if "openvino" in formats:
        from act.core.optional_deps import import_openvino

        import_openvino("act export --format openvino")  # likewise
    kind, path, folder = resolve_source(source)
    cfg = _run_config(folder, overrides or [])
    ex = cfg.export if cfg is not None else ExportConfig()
    if "openvino" in formats:
        ex = ex.model_copy(update={"openvino": ex.openvino.model_copy(update={"enabled": True})})
    result: Dict[str, Any] = {"source": str(path)}
    if kind == "checkpoint":
        onnx_path = export_checkpoint(path, cfg, ex, dynamic=ex.dynamic if dynamic is None else dynamic,
                                      batch=batch or ex.batch, imgsz=imgsz, out=out, result=result, log=log)
    else:
        onnx_path = path
        from act.deploy.export import lint_after_export

        result["onnx"] = {"path": str(onnx_path), "lint": lint_after_export(onnx_path)}
        if "openvino" in formats:
            result["openvino"] = openvino_from_onnx(onnx_path, cfg, ex, log)
    if engine:
        from act.deploy.tensorrt import build_engine

        engine_path = Path(out).with_suffix(".engine") if out and kind == "onnx" else onnx_path.with_suffix(".engine")
        result["engine"] = build_engine(onnx_path, engine_path, ex.tensorrt, log=log)
        log(f"act: wrote {engine_path}  (load it with YOLO({str(engine_path)!r}); time it with "
            f"python tools/bench_engine.py {engine_path})")
    (folder / "export.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def export_checkpoint(path: Path, cfg: Optional[RunConfig], ex, dynamic: bool, batch: int, imgsz: Optional[int],
                      out: Optional[str], result: Dict[str, Any], log=print) -> Path:
    from act.blocks.checkpoint import load_checkpoint
    from act.deploy.export import (export_onnx, lint_after_export, parity, qdq_summary, raise_if_failed, torch_outputs,
                            verify_openvino)
    from act.core.family import family_for

    ckpt = load_checkpoint(path)
    student = ckpt["model"].float().eval()
    family = family_for(student)
    imgsz = imgsz or (ckpt.get("train_args") or {}).get("imgsz") or (cfg.data.imgsz if cfg else None)
    if not imgsz:
        raise ConfigError("act export: the checkpoint does not say its image size; pass --imgsz")
    act_cfg = (ckpt.get("act") or {}).get("config") or {}
    skip = list((act_cfg.get("quant") or {}).get("skip") or []) + list(family.float_patterns)
    name = "student_dynamic.onnx" if dynamic else "student.onnx"
    onnx_path = Path(out) if out else path.parent / name
    onnx_path = export_onnx(student, onnx_path, family, int(imgsz), batch, ex.opset, dynamic,
                            metadata={"act": json.dumps({"source": path.name})}, simplify=ex.simplify, skip=skip,
                            target=ex.target)
    images = _parity_images(cfg, int(imgsz), ex.parity_images, family)
    reference = torch_outputs(student, family, images)
    par = parity(student, onnx_path, family, images, ex.parity_tolerance, raise_on_fail=False,
                 branch_tolerance=ex.branch_tolerance, reference=reference)
    result["onnx"] = {"path": str(onnx_path), "dynamic": dynamic, "batch": batch, "imgsz": int(imgsz), "parity": par,
                      "qdq": qdq_summary(onnx_path)}
    result["onnx"]["lint"] = lint_after_export(onnx_path, quantized=result["onnx"]["qdq"]["QuantizeLinear"] > 0)
    log(f"act: wrote {onnx_path} (parity rel L2 {par['rel_l2']:.3g}, lint "
        f"{'clean' if result['onnx']['lint']['clean'] else str(result['onnx']['lint']['errors']) + ' findings'})")
    result["openvino"] = verify_openvino(onnx_path, student, family, images, ex, reference, log=log)
    raise_if_failed(onnx_path, par, result["openvino"])  # ParityError (exit 3)
    return onnx_path


def openvino_from_onnx(onnx_path: Path, cfg: Optional[RunConfig], ex, log=print) -> Dict[str, Any]:
    """The IR of an existing Q/DQ ONNX, checked against onnxruntime running that ONNX (no torch student here)."""
    import onnx

    from act.core.errors import ParityError
    from act.deploy import openvino
    from act.deploy.onnx_hygiene import metadata_of
    from act.deploy.export import compare, onnx_outputs, parity_message

    proto = onnx.load(str(onnx_path))
    meta = metadata_of(proto)
    imgsz = (meta.get("imgsz") or [640])[0]
    xml = openvino.write_ir(onnx_path)
    images = _parity_images(cfg, int(imgsz), ex.parity_images)
    ref = onnx_outputs(onnx_path, images)
    got, info = openvino.outputs(xml, images, ex.openvino.precision)
    nc = len(meta.get("names") or {0: "object"})
    branches = {"box": slice(0, 4), "cls": slice(4, 4 + nc)}
    if meta.get("kpt_shape"):
        branches["kpt"] = slice(4 + nc, None)
    res = compare("openvino (vs onnxruntime)", ref, got, branches, ex.openvino.parity_tolerance)
    res.update(info)
    log(f"act: wrote {xml.parent} (vs onnxruntime per-branch rel L2 "
        + ", ".join(f"{k} {v:.3g}" for k, v in res["branches"].items()) + ")")
    if not res["passed"]:
        raise ParityError(parity_message(xml.parent, res))
    return {"path": str(xml.parent), "parity": res, "required": True, "random_images": cfg is None}


def _parity_images(cfg: Optional[RunConfig], imgsz: int, n: int, family=None):
    """The run's first pool images; without a run config (or a readable pool) the sample images of the model family
    (`sample_images`, e.g. the two Ultralytics ships), else random ones. Real images matter: on noise the class scores are all near
    zero and their per-branch error means little."""
    import torch

    from act.blocks.data import load_images, resolve_source as resolve_images
    from act.core.family import default_family

    family = family or default_family()
    sources = [cfg.data.train] if cfg is not None else []
    for source in sources + ([family.sample_images] if getattr(family, "sample_images", None) else []):
        try:
            return load_images(resolve_images(source)[:n], imgsz, family.letterbox)
        except (ActError, OSError):
            pass
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, imgsz, imgsz, generator=g)
