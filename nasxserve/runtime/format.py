"""The bundle format (DESIGN.md, "The bundle"): names and rules shared by the writer and the reader."""
from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = "nasx-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
PT2_FILE = "model.pt2"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
PARITY_FILE = "parity.npz"
PROTOTYPES_DIR = "prototypes"
FORMAT_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE, "pt2": PT2_FILE}
REQUIRED_FILES = (ONNX_FILE, WEIGHTS_FILE, CONFIG_FILE, PARITY_FILE)

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "similarities", "min_distances", "best_patch", "similarity_maps")
METADATA_PREFIX = "nasx."

# Export-time and verify-time agreement between an engine and PyTorch, per float output: an element may differ
# by ATOL[name] + rtol * (the largest |value| of that output for the same image) (runtime.parity.ParityRule).
ATOL = {"logits": 1e-4, "similarities": 1e-4, "min_distances": 1e-4, "similarity_maps": 1e-3}
RTOL = 1e-5


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prototype_patch(prototype: int) -> str:
    return f"{PROTOTYPES_DIR}/{prototype:04d}.png"


def prototype_context(prototype: int) -> str:
    return f"{PROTOTYPES_DIR}/{prototype:04d}_context.png"
