"""act: auto-compression for Ultralytics YOLO. Label-free distillation QAT to a TensorRT-ready Q/DQ ONNX."""

import os as _os

# Whether the user asked for offline before act set its default: a registered teacher that is not on disk is then
# never fetched (teachers.resolve_teacher). Otherwise Ultralytics stays off the network inside act (YOLO_OFFLINE=1).
USER_OFFLINE = _os.environ.get("YOLO_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
_os.environ.setdefault("YOLO_OFFLINE", "1")

__version__ = "0.1.0"

# The public names load on first use (PEP 562), so that `import act.errors` / `import act.family` (which teachers/ and
# families/ do) never pull in act.compress, which imports teachers: `import teachers` before `import act` must work.
_LAZY = {
    "AutoCompression": "act.compress",
    "PostTrainingQuantization": "act.ptq",
    "RunConfig": "act.config",
    "load_config": "act.config",
    "quantize": "act.quant",
    "calibrate": "act.quant",
}

__all__ = ["AutoCompression", "PostTrainingQuantization", "RunConfig", "load_config", "quantize", "calibrate",
           "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'act' has no attribute {name!r}")
