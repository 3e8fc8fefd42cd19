"""Mixed precision for the weight steps: bf16 autocast on CUDA, fp16 with a gradient scaler where a GPU
lacks bf16, full fp32 on the CPU (and wherever ``precision: fp32`` asks for it).

Only what is robust to a few bits of mantissa runs under autocast: the weight step's forward pass and
the evaluation forward passes. Steps that take differences of nearby gradients (second-order DARTS'
eq. 8, LeaSE's eq. 11, the Hessian power iteration) and the prototype projection stay in fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from nasxserve.errors import ConfigError


@dataclass
class Precision:
    """``dtype`` None = fp32; ``scaler`` only for fp16 (bf16 has fp32's exponent range)."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        """A context running its forward passes in ``dtype`` (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device, bf16_supported: bool | None = None) -> Precision:
    """``name`` (auto, fp32, bf16, fp16) on ``device`` -> the precision to train in.

    auto: bf16 on a CUDA GPU that supports it, else fp16 with a gradient scaler; fp32 on the CPU, whose
    bf16 kernels are slower than fp32 on most processors."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return Precision(device.type)
    if device.type != "cuda" and name == "fp16":
        raise ConfigError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    if bf16_supported is None:
        bf16_supported = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "bf16" and not bf16_supported:
        raise ConfigError("this GPU has no bf16 support; use precision fp16 (or auto, which picks it)")
    if name == "bf16" or (name == "auto" and bf16_supported):
        return Precision(device.type, torch.bfloat16)
    return Precision(device.type, torch.float16, torch.amp.GradScaler(device.type))
