"""The inference graph every exported format holds, and the exporters that freeze it.

:class:`InferenceNet` is the prototype path of a trained :class:`ExplainableNet` in eval mode with
the five outputs of the bundle contract (docs/design.md, "The model"): the auxiliary head h1 and the
DARTS tower are training aids and are left out.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from nasxserve.errors import BundleError
from nasxserve.nas.ops import FactorizedReduce
from nasxserve.protos.model import ExplainableNet
from nasxserve.runtime.format import INPUT_NAME, OUTPUT_NAMES

DEFAULT_OPSET = 18


class InferenceNet(nn.Module):
    """x (B, C, H, W) normalised float32 -> (logits (B, K), similarities (B, m), min_distances (B, m),
    best_patch (B, m) int64 flat index ``row * W' + col`` into the latent grid, similarity_maps
    (B, m, H', W')). ``logits[b, k] == sum_j w[k, j] * similarities[b, j]`` exactly (no bias)."""

    def __init__(self, model: ExplainableNet):
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        a = m.prototype_layer(m.add_on(m.features(x)))
        return m.last_layer(a.similarities), a.similarities, a.min_distances, a.best_patch, a.similarity_maps


def inference_form(model: ExplainableNet) -> ExplainableNet:
    """A copy of ``model`` in eval mode that computes the same function with fewer graph nodes, for the exporters:
    each :class:`~nasxserve.nas.ops.FactorizedReduce` as one convolution (its ``as_one_conv``). The sums run in
    another order, so outputs differ in the last float bits; the export's parity check against the model as
    trained bounds that."""
    out = copy.deepcopy(model).eval()
    swaps = [(parent, name, child) for parent in out.modules() for name, child in parent.named_children()
             if isinstance(child, FactorizedReduce)]
    for parent, name, child in swaps:
        setattr(parent, name, child.as_one_conv())
    return out


def _batch_dynamic():
    return {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_program(net: InferenceNet, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch axis (the spatial size is fixed by the training data)."""
    return torch.export.export(net, (example,), dynamic_shapes=_batch_dynamic(), strict=False)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter logs its internal fallbacks with tracebacks; what matters is checked afterwards."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(net: InferenceNet, example: torch.Tensor, opset: int = DEFAULT_OPSET):
    """The dynamo ONNX exporter with ``dynamic_shapes``; returns an in-memory ``onnx.ModelProto``."""
    with warnings.catch_warnings(), _quiet_loggers("onnxscript", "torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=_batch_dynamic(),
                                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    opset_version=opset, optimize=True, verbose=False, report=False)
    assert program is not None                  # the dynamo exporter returns its program
    proto = program.model_proto
    produced = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if produced != opset:
        # the exporter falls back to its own opset (with a warning) when it cannot convert
        raise BundleError(f"the ONNX exporter could not produce opset {opset} (it made {produced}); "
                          f"choose an opset it supports, e.g. {DEFAULT_OPSET}")
    return proto


def export_torchscript(net: InferenceNet, example: torch.Tensor) -> bytes:
    """TorchScript by tracing (the graph has no data-dependent control flow). PyTorch's deprecation
    warning for TorchScript is silenced: it concerns PyTorch's roadmap, not this artifact."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, str(path))


def load_program(source: Path | BinaryIO) -> torch.nn.Module:
    """A saved ``torch.export`` program (a path, or its bytes as a file) as a callable module."""
    return torch.export.load(str(source) if isinstance(source, Path) else source).module()


def load_torchscript(source: Path | BinaryIO) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(source) if isinstance(source, Path) else source, map_location="cpu")
