"""Agreement of two runs of the same model on the same input (e.g. ONNX Runtime vs PyTorch).

Two engines compute the same float32 graph in different orders (fused kernels, other reductions), so their
outputs differ by rounding, and rounding grows with the size of what is summed: a logit is a sum over all m
prototypes, a distance a sum over D channels. An absolute tolerance that holds for 20 prototypes refuses a
fine-grained model with 2,000 (a 200-class model's logits of magnitude ~10 differ by ~1e-4 from reordering
alone). So each element may differ by ``atol + rtol * scale``, where scale is the largest absolute value of the
same output for the same image: float32 reordering errors are proportional to the magnitude of the terms, and
the largest value of the output bounds them from below better than the element itself does (a logit near 0
can be a sum of large terms that cancel). The top-1 class must be the same, and best-patch positions the same
except where the two positions' similarities tie within the similarity maps' tolerance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nasxserve.contracts import Manifest
from nasxserve.runtime.format import ATOL, OUTPUT_NAMES, RTOL


@dataclass(frozen=True)
class ParityRule:
    """``|candidate - reference| <= atol[name] + rtol * max|reference[b, ...]|`` for every float output and
    image b (module docstring)."""

    atol: dict[str, float] = field(default_factory=lambda: dict(ATOL))
    rtol: float = RTOL

    def allowed(self, name: str, reference: np.ndarray) -> np.ndarray:
        """(B, 1, ...) the tolerance of each image's elements of ``reference`` (B, ...), output ``name``."""
        scale = np.abs(reference.astype(np.float64)).reshape(len(reference), -1).max(axis=1, initial=0.0)
        return (self.atol[name] + self.rtol * scale).reshape((-1,) + (1,) * (reference.ndim - 1))

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), scale="per image, the largest |value| of the same output")

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ParityRule:
        """The rule a bundle was exported with (``export.parity_rule``)."""
        rule = manifest.export.parity_rule
        return cls(atol={**ATOL, **rule.atol}, rtol=rule.rtol)


@dataclass
class Agreement:
    """How far ``candidate`` is from ``reference``.

    max_abs: largest absolute difference per float output; worst: per float output, the largest ratio of a
    difference to its tolerance (above 1 fails); top1_mismatches: images whose top-1 class differs;
    patch_mismatches: best_patch entries that differ where the reference's similarities at the two positions
    are further apart than the similarity maps' tolerance (i.e. not a tie).
    """

    max_abs: dict[str, float] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    top1_mismatches: int = 0
    patch_mismatches: int = 0
    patch_ties: int = 0
    images: int = 0

    @property
    def ok(self) -> bool:
        return all(v <= 1.0 for v in self.worst.values()) and self.top1_mismatches == 0 and self.patch_mismatches == 0

    def merge(self, other: Agreement) -> Agreement:
        def larger(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}
        return Agreement(larger(self.max_abs, other.max_abs), larger(self.worst, other.worst),
                         self.top1_mismatches + other.top1_mismatches, self.patch_mismatches + other.patch_mismatches,
                         self.patch_ties + other.patch_ties, self.images + other.images)

    def failures(self) -> list[str]:
        out = [f"{k} differ by up to {self.max_abs[k]:.2e}, {v:.1f}x the tolerance"
               for k, v in sorted(self.worst.items()) if v > 1.0]
        if self.top1_mismatches:
            out.append(f"top-1 class differs on {self.top1_mismatches} of {self.images} images")
        if self.patch_mismatches:
            out.append(f"best_patch differs at {self.patch_mismatches} non-tied positions")
        return out

    def to_dict(self) -> dict:
        return {"ok": self.ok, "images": self.images, "max_abs": self.max_abs, "worst_vs_tolerance": self.worst,
                "top1_mismatches": self.top1_mismatches, "best_patch_mismatches": self.patch_mismatches,
                "best_patch_ties": self.patch_ties}


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            rule: ParityRule = ParityRule()) -> Agreement:
    """Both dicts hold the five outputs (``OUTPUT_NAMES``) for the same batch of B images."""
    missing = [n for n in OUTPUT_NAMES if n not in candidate]
    if missing:
        raise ValueError(f"outputs {missing} are missing")
    result = Agreement(images=int(reference["logits"].shape[0]))
    for name in rule.atol:
        diff = np.abs(reference[name].astype(np.float64) - candidate[name].astype(np.float64))
        result.max_abs[name] = float(diff.max(initial=0.0))
        result.worst[name] = float((diff / rule.allowed(name, reference[name])).max(initial=0.0))
    result.top1_mismatches = int((reference["logits"].argmax(1) != candidate["logits"].argmax(1)).sum())
    ref_idx, cand_idx = reference["best_patch"], candidate["best_patch"]
    differ = ref_idx != cand_idx
    if differ.any():
        maps = reference["similarity_maps"].reshape(*ref_idx.shape, -1)              # (B, m, H'W')
        at_ref = np.take_along_axis(maps, ref_idx[..., None], -1)[..., 0]
        at_cand = np.take_along_axis(maps, np.clip(cand_idx, 0, maps.shape[-1] - 1)[..., None], -1)[..., 0]
        valid = (cand_idx >= 0) & (cand_idx < maps.shape[-1])
        allowed = rule.allowed("similarity_maps", reference["similarity_maps"])[..., 0, 0]
        tied = valid & (np.abs(at_ref - at_cand) <= allowed)
        result.patch_ties = int((differ & tied).sum())
        result.patch_mismatches = int((differ & ~tied).sum())
    return result
