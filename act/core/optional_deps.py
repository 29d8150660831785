"""Optional dependencies: import one, or fail with what it is needed for and how to install it (exit code 2)."""

from __future__ import annotations

from act.core.errors import ActError


class TensorRTMissing(ActError):
    """The optional `tensorrt` package is not installed. Exit code 2."""

    exit_code = 2


INSTALL_HINT = "pip install act[tensorrt]  (or NVIDIA's `tensorrt` wheel matching your CUDA; needs an NVIDIA GPU)"


def import_tensorrt(purpose: str = "building a TensorRT engine"):
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise TensorRTMissing(f"{purpose} needs the `tensorrt` Python package, which is not installed "
                              f"here ({e}). Install it with: {INSTALL_HINT}") from None
    except Exception as e:  # e.g. the wheel is there but libnvinfer / the CUDA driver is not
        raise TensorRTMissing(f"the `tensorrt` package is installed but cannot load ({type(e).__name__}: {e}). "
                              f"It needs an NVIDIA GPU, its driver and a matching CUDA; see {INSTALL_HINT}") from None
    return trt


class OpenVINOMissing(ActError):
    """The optional `openvino` package is not installed. Exit code 2."""

    exit_code = 2


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def import_openvino(purpose: str = "the OpenVINO export"):
    try:
        import openvino as ov
    except ImportError as e:
        raise OpenVINOMissing(f"{purpose} needs the `openvino` Python package, which is not installed here ({e}). "
                              f"Install it with: pip install act[openvino]") from None
    return ov
