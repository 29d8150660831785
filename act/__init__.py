"""act: auto-compression for Ultralytics YOLO. Label-free distillation QAT to a TensorRT-ready Q/DQ ONNX."""

import os as _os

_os.environ.setdefault("YOLO_OFFLINE", "1")  # act never lets Ultralytics reach for the network

__version__ = "0.1.0"

from act.compress import AutoCompression  # noqa: E402
from act.config import RunConfig, load_config  # noqa: E402
from act.ptq import PostTrainingQuantization  # noqa: E402
from act.quant import calibrate, quantize  # noqa: E402

__all__ = ["AutoCompression", "PostTrainingQuantization", "RunConfig", "load_config", "quantize", "calibrate",
           "__version__"]
