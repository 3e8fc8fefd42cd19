"""nasx: search, train, export and serve explainable (prototype) image classifiers."""
from __future__ import annotations

__version__ = "0.1.0"
