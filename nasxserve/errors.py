"""Errors a user can cause. The CLI prints their message and exits non-zero, no traceback."""
from __future__ import annotations


class NasxError(Exception):
    """Base class: the message says what went wrong and what to do about it."""

    exit_code = 2


class ConfigError(NasxError):
    """A configuration file or option is invalid."""


class DataError(NasxError):
    """A dataset is missing, empty or malformed."""


class GenotypeError(NasxError):
    """A genotype name, file or string is invalid."""


class DeviceError(NasxError):
    """The requested compute device is not available."""


class RunDirError(NasxError):
    """A run directory cannot be created, resumed or read."""


class BundleError(NasxError):
    """An exported bundle is missing, incomplete, tampered with or of an unknown format."""


class ImageError(NasxError):
    """An input image cannot be read or used."""


class ImageTooLarge(ImageError):
    """An input image has more pixels than the configured limit."""


class RuntimeSetupError(NasxError):
    """The inference runtime (ONNX Runtime) is missing or installed in a broken state."""


class EvaluationError(NasxError):
    """A model or dataset cannot be evaluated as asked."""
