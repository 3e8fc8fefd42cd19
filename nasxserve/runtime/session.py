"""ONNX Runtime: a clear word when it is broken, and the CUDA provider only when it really works.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install into the same ``onnxruntime`` folder. With
both installed, or one uninstalled over the other, ``import onnxruntime`` half-works (the package
imports but has no ``InferenceSession``, or its native module is gone); :func:`import_onnxruntime`
detects that state and says the one command that repairs it.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import logging
import platform
import sys
from functools import lru_cache
from typing import Any

from nasxserve.errors import RuntimeSetupError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def wanted_distribution() -> str:
    """The ONNX Runtime wheel nasx depends on here (its environment markers)."""
    linux_x86 = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
    return "onnxruntime-gpu" if linux_x86 else "onnxruntime"


def repair_command() -> str:
    return (f"{sys.executable} -m pip uninstall -y onnxruntime onnxruntime-gpu && "
            f"{sys.executable} -m pip install {wanted_distribution()}")


@lru_cache(maxsize=1)
def import_onnxruntime() -> Any:
    """Import onnxruntime, or raise :class:`RuntimeSetupError` with the command that fixes it."""
    both = _installed("onnxruntime") and _installed("onnxruntime-gpu")
    try:
        ort = importlib.import_module("onnxruntime")
        usable = hasattr(ort, "InferenceSession") and hasattr(ort, "get_available_providers")
    except ImportError as e:
        if not (_installed("onnxruntime") or _installed("onnxruntime-gpu")) and e.name == "onnxruntime":
            raise RuntimeSetupError(f"ONNX Runtime is not installed; install it with: "
                                    f"{sys.executable} -m pip install {wanted_distribution()}") from None
        usable = False
    if not usable:
        state = ("both onnxruntime and onnxruntime-gpu are installed" if both
                 else "the onnxruntime package is incomplete")
        raise RuntimeSetupError(f"ONNX Runtime cannot be used ({state}; they share one folder); fix it with: "
                                f"{repair_command()}")
    if both:
        log.warning("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other. Fix: %s",
                    repair_command())
    return ort


def _cuda_device_present() -> bool:
    """Ask the CUDA driver itself: onnxruntime-gpu lists its CUDA provider even on machines with no GPU."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def _cuda_usable(ort: Any) -> bool:
    if CUDA not in ort.get_available_providers() or not _cuda_device_present():
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()   # the CUDA / cuDNN libraries of installed nvidia-* wheels (e.g. torch's)
        except Exception as e:  # noqa: BLE001 - a failed preload only means CUDA libraries come from the system
            log.debug("onnxruntime.preload_dlls failed: %s", e)
    return True


def create_session(model: bytes | str, provider: str = "auto", threads: int | None = None) -> Any:
    """An ``InferenceSession`` on ``provider`` ("auto": CUDA when it really works, else CPU, quietly).

    Returns the session; ``session.get_providers()[0]`` is the provider actually in use.
    """
    if provider not in PROVIDERS:
        raise RuntimeSetupError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3          # CUDA-provider fallbacks are reported by us, not by ORT's logger
    if threads:
        options.intra_op_num_threads = threads
    use_cuda = provider != "cpu" and _cuda_usable(ort)
    if provider == "cuda" and not use_cuda:
        raise RuntimeSetupError("the CUDA provider was asked for but no usable CUDA GPU was found "
                                "(needs onnxruntime-gpu, an NVIDIA driver and a GPU); use --provider cpu or auto")
    providers = [CUDA, CPU] if use_cuda else [CPU]
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    if use_cuda and session.get_providers()[0] != CUDA:
        if provider == "cuda":
            raise RuntimeSetupError("ONNX Runtime could not start its CUDA provider (CUDA or cuDNN libraries "
                                    "missing?); use --provider cpu")
        log.info("CUDA provider unavailable, running on CPU")
    return session
