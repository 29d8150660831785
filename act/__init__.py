"""act: auto-compression for Ultralytics YOLO. Label-free distillation QAT to an INT8 Q/DQ ONNX for TensorRT or OpenVINO.

The package is layered; each subpackage imports only from those listed before it (docs/architecture.md,
tests/test_architecture.py): `core` (config, errors, registries, the model-family protocol), `blocks` (quantization,
distillation, pruning, data, metrics), `deploy` (ONNX export, TensorRT, OpenVINO, the Q/DQ linter), `run` (one run:
Trainer, PTQ, delivery, report), `orchestrate` (stages, strategy auto, analysis, AutoCompression), `cli`. The model
families (`families/`) and the teacher registry (`teachers/`) sit between the core and the blocks."""

import os as _os

# Whether the user asked for offline before act set its default: a registered teacher that is not on disk is then
# never fetched (teachers.resolve_teacher). Otherwise Ultralytics stays off the network inside act (YOLO_OFFLINE=1).
USER_OFFLINE = _os.environ.get("YOLO_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
_os.environ.setdefault("YOLO_OFFLINE", "1")

__version__ = "0.1.0"

from act.core import renamed as _renamed  # noqa: E402 (checkpoints pickled before the layer packages still load)

_renamed.install()

# The public names load on first use (PEP 562), so that `import act.core.errors` / `import act.core.family` (which teachers/ and
# families/ do) never pull in act.orchestrate.compress, which imports teachers: `import teachers` before `import act` must work.
_LAZY = {
    "AutoCompression": "act.orchestrate.compress",
    "PostTrainingQuantization": "act.run.ptq",
    "RunConfig": "act.core.config",
    "load_config": "act.core.config",
    "quantize": "act.blocks.quant",
    "calibrate": "act.blocks.quant",
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
