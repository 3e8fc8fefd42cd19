"""Live parity of a loaded bundle: ONNX Runtime against PyTorch rebuilt from ``weights.safetensors``.

Only pickle-free files are loaded by default: ``weights.safetensors`` and ``config.json`` rebuild the model,
ONNX Runtime runs ``model.onnx``. ``model.ts`` (``torch.jit.load``) and ``model.pt2`` (``torch.export.load``,
which falls back to ``torch.load(weights_only=False)``) unpickle their contents, so loading a crafted one runs
its author's code; they are only checked against their sha256 unless the caller trusts them explicitly.
"""
from __future__ import annotations

import io

import numpy as np

from nasxserve.export.bundle import torch_outputs, load_pytorch_model
from nasxserve.export.graph import InferenceNet, load_program, load_torchscript
from nasxserve.runtime.bundle import Bundle
from nasxserve.runtime.format import PARITY_FILE, PT2_FILE, TORCHSCRIPT_FILE
from nasxserve.runtime.parity import Agreement, ParityRule, compare

TORCH_FILES = {"torchscript": TORCHSCRIPT_FILE, "pt2": PT2_FILE}


def live_parity(bundle: Bundle, trust_torch_files: bool = False) -> dict[str, Agreement]:
    """``model.onnx`` of ``bundle`` against eager PyTorch rebuilt from ``weights.safetensors`` on the inputs stored
    in ``parity.npz``, by the parity rule the bundle was exported with; with ``trust_torch_files`` also the
    TorchScript and .pt2 files when present (loading them executes code from the bundle)."""
    with np.load(bundle.root / PARITY_FILE, allow_pickle=False) as data:
        x = data["input"]
    reference = torch_outputs(InferenceNet(load_pytorch_model(bundle.root, verify=False)), x)   # verified on load
    rule = ParityRule.from_manifest(bundle.manifest)
    result = {"onnx": compare(reference, bundle.run(x), rule)}
    if not trust_torch_files:
        return result
    # loaded from the bytes checked against the manifest, not from the folder again
    if TORCHSCRIPT_FILE in bundle.manifest.files:
        script = load_torchscript(io.BytesIO(bundle.file_bytes(TORCHSCRIPT_FILE)))
        result["torchscript"] = compare(reference, torch_outputs(script, x), rule)
    if PT2_FILE in bundle.manifest.files:
        program = load_program(io.BytesIO(bundle.file_bytes(PT2_FILE)))
        result["pt2"] = compare(reference, torch_outputs(program, x), rule)
    return result

