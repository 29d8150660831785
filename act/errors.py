"""User-facing errors: each carries the exit code the CLI returns and a message meant for a person, not a traceback."""

from __future__ import annotations


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
