"""Torch-free inference on an exported bundle: numpy, Pillow and ONNX Runtime only.

>>> bundle = load_bundle("bundle/")                   # doctest: +SKIP
>>> bundle.predict(["seven.png"], top_k=3)            # doctest: +SKIP
>>> bundle.explain(["seven.png"], top_prototypes=5)   # doctest: +SKIP
"""
from __future__ import annotations

from nasxserve.runtime.bundle import Bundle, PreparedImages, load_bundle
from nasxserve.runtime.files import read_manifest, verify_files
from nasxserve.runtime.format import FORMAT_VERSION, OUTPUT_NAMES

__all__ = ["Bundle", "FORMAT_VERSION", "OUTPUT_NAMES", "PreparedImages", "load_bundle", "read_manifest",
           "verify_files"]
