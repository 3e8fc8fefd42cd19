"""Agreement of two runs of the same model on the same input (e.g. ONNX Runtime vs PyTorch)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nasxserve.runtime.format import OUTPUT_NAMES, TOLERANCE


@dataclass
class Agreement:
    """How far ``candidate`` is from ``reference``.

    max_abs: largest absolute difference per float output; top1_mismatches: images whose top-1 class
    differs; patch_mismatches: best_patch entries that differ where the reference's similarities at
    the two positions are further apart than the similarity-map tolerance (i.e. not a tie).
    """

    max_abs: dict[str, float] = field(default_factory=dict)
    top1_mismatches: int = 0
    patch_mismatches: int = 0
    patch_ties: int = 0
    images: int = 0

    @property
    def ok(self) -> bool:
        return (all(v <= TOLERANCE[k] for k, v in self.max_abs.items())
                and self.top1_mismatches == 0 and self.patch_mismatches == 0)

    def merge(self, other: "Agreement") -> "Agreement":
        keys = set(self.max_abs) | set(other.max_abs)
        return Agreement({k: max(self.max_abs.get(k, 0.0), other.max_abs.get(k, 0.0)) for k in keys},
                         self.top1_mismatches + other.top1_mismatches, self.patch_mismatches + other.patch_mismatches,
                         self.patch_ties + other.patch_ties, self.images + other.images)

    def failures(self) -> list[str]:
        out = [f"{k} differ by up to {v:.2e} (tolerance {TOLERANCE[k]:.0e})"
               for k, v in sorted(self.max_abs.items()) if v > TOLERANCE[k]]
        if self.top1_mismatches:
            out.append(f"top-1 class differs on {self.top1_mismatches} of {self.images} images")
        if self.patch_mismatches:
            out.append(f"best_patch differs at {self.patch_mismatches} non-tied positions")
        return out

    def to_dict(self) -> dict:
        return {"ok": self.ok, "images": self.images, "max_abs": self.max_abs,
                "top1_mismatches": self.top1_mismatches, "best_patch_mismatches": self.patch_mismatches,
                "best_patch_ties": self.patch_ties}


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Agreement:
    """Both dicts hold the five outputs (``OUTPUT_NAMES``) for the same batch of B images."""
    missing = [n for n in OUTPUT_NAMES if n not in candidate]
    if missing:
        raise ValueError(f"outputs {missing} are missing")
    result = Agreement(images=int(reference["logits"].shape[0]))
    for name in TOLERANCE:
        diff = np.abs(reference[name].astype(np.float64) - candidate[name].astype(np.float64))
        result.max_abs[name] = float(diff.max(initial=0.0))
    result.top1_mismatches = int((reference["logits"].argmax(1) != candidate["logits"].argmax(1)).sum())
    ref_idx, cand_idx = reference["best_patch"], candidate["best_patch"]
    differ = ref_idx != cand_idx
    if differ.any():
        maps = reference["similarity_maps"].reshape(*ref_idx.shape, -1)              # (B, m, H'W')
        at_ref = np.take_along_axis(maps, ref_idx[..., None], -1)[..., 0]
        at_cand = np.take_along_axis(maps, np.clip(cand_idx, 0, maps.shape[-1] - 1)[..., None], -1)[..., 0]
        valid = (cand_idx >= 0) & (cand_idx < maps.shape[-1])
        tied = valid & (np.abs(at_ref - at_cand) <= TOLERANCE["similarity_maps"])
        result.patch_ties = int((differ & tied).sum())
        result.patch_mismatches = int((differ & ~tied).sum())
    return result
