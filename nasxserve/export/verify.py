"""Live parity of a loaded bundle: ONNX Runtime against PyTorch rebuilt from ``weights.safetensors``."""
from __future__ import annotations

import numpy as np

from nasxserve.export.bundle import torch_outputs, load_pytorch_model
from nasxserve.export.graph import InferenceNet, load_program, load_torchscript
from nasxserve.runtime.bundle import Bundle
from nasxserve.runtime.format import PARITY_FILE, PT2_FILE, TORCHSCRIPT_FILE
from nasxserve.runtime.parity import Agreement, ParityRule, compare


def live_parity(bundle: Bundle) -> dict[str, Agreement]:
    """Each model file of ``bundle`` (ONNX, and TorchScript / .pt2 when present) against eager PyTorch
    on the inputs stored in ``parity.npz``, by the parity rule the bundle was exported with."""
    with np.load(bundle.root / PARITY_FILE, allow_pickle=False) as data:
        x = data["input"]
    reference = torch_outputs(InferenceNet(load_pytorch_model(bundle.root, verify=False)), x)   # verified on load
    rule = ParityRule.from_manifest(bundle.manifest)
    result = {"onnx": compare(reference, bundle.run(x), rule)}
    if TORCHSCRIPT_FILE in bundle.manifest["files"]:
        result["torchscript"] = compare(reference, torch_outputs(load_torchscript(bundle.root / TORCHSCRIPT_FILE), x),
                                        rule)
    if PT2_FILE in bundle.manifest["files"]:
        result["pt2"] = compare(reference, torch_outputs(load_program(bundle.root / PT2_FILE), x), rule)
    return result
