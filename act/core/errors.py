"""User-facing errors: each carries the exit code the CLI returns and a message meant for a person, not a traceback.

Exit codes: 1 other failure, 2 bad config or input (config, images, model), 3 export parity, 4 training diverged
(non-finite loss/gradients past the limit), 5 out of a resource (disk full, read-only or unwritable output, CUDA out of
memory), 130 interrupted by SIGINT (Ctrl-C), 143 stopped by SIGTERM. See docs/reliability.md.
"""

from __future__ import annotations

from typing import Optional


class ActError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a stack trace."""

    exit_code = 1


class ConfigError(ActError):
    """A config key is unknown, has the wrong type or value, or names a missing file. Exit code 2."""

    exit_code = 2


class DataError(ActError):
    """The image source is missing, empty, or holds nothing readable."""

    exit_code = 2


class ModelError(ActError):
    """A checkpoint is missing, is not an Ultralytics model, or has a head act does not support."""

    exit_code = 2


class ParityError(ActError):
    """The exported ONNX does not reproduce the torch student within rounding."""

    exit_code = 3


class DivergedError(ActError):
    """Training kept producing non-finite losses or gradients past train.nan_policy's limits. best.pt is kept."""

    exit_code = 4


class ResourceError(ActError):
    """Out of a resource: disk full, an unwritable output, CUDA out of memory. Earlier checkpoints are intact."""

    exit_code = 5


class Interrupted(ActError):
    """Stopped by SIGINT (exit 130) or SIGTERM (exit 143) after writing last.pt."""

    def __init__(self, message: str, exit_code: int = 130, iteration: Optional[int] = None, state: str = ""):
        super().__init__(message)
        self.exit_code = exit_code
        self.iteration = iteration  # where the run stopped, and what it saved ("last.pt saved at ..."):
        self.state = state  # a staged run words its own message from them
