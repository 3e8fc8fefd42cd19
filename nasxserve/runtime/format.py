"""The bundle format (docs/design.md, "The bundle"): names and rules shared by the writer and the reader."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nasxserve.contracts import FORMAT, FORMAT_VERSION, Manifest, ManifestBody  # noqa: F401 - the format's names

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

# The manifest lists every other file with its sha256; its own sha256 (``manifest_digest``) is stored in it under
# DIGEST_FIELD, so one digest covers the whole bundle. The same person can rewrite both: it proves integrity,
# and authenticity only when compared with a digest obtained another way (``nasx verify --expect-digest``).
DIGEST_FIELD = "bundle_digest"
# what the exporter stores in the ONNX graph's own metadata (nasx.<key>), checked against the manifest on load
ONNX_METADATA_KEYS = ("format", "format_version", "nasx_version", "name", "classes", "input", "latent_grid",
                      "similarity")

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


def prototype_patch(prototype: int, regions: str = "activation") -> str:
    """The bundle file of a prototype's source patch as the region rule ``regions`` boxes it."""
    return f"{PROTOTYPES_DIR}/{prototype:04d}{_rule_suffix(regions)}.png"


def prototype_context(prototype: int, regions: str = "activation") -> str:
    """The bundle file of a prototype's source image with the box of the region rule ``regions`` drawn."""
    return f"{PROTOTYPES_DIR}/{prototype:04d}{_rule_suffix(regions)}_context.png"


def _rule_suffix(regions: str) -> str:
    # ProtoPNet's activation box keeps the names bundles have always had
    return "" if regions == "activation" else f"_{regions}"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its ``DIGEST_FIELD``, as canonical JSON (sorted keys, no spaces, UTF-8)."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Store the manifest's digest in it (after every other field, the file list included, is final)."""
    manifest[DIGEST_FIELD] = {"sha256": manifest_digest(manifest),
                              "of": "this manifest without this field, as JSON with sorted keys, no spaces, UTF-8; "
                                    "the manifest holds every other file's sha256"}
    return manifest


def seal(body: ManifestBody) -> Manifest:
    """The manifest ``body`` with its digest (:func:`seal_manifest`), once every other field is final."""
    return Manifest.model_validate(seal_manifest(body.as_json()))
