"""Plain verdicts on a model's explanations: one line per measure with a threshold a reader can act on, each
saying what was found and where the docs explain the measure. ``nasx evaluate`` ends with the verdicts of its
measurements (:func:`evaluation_verdicts`); ``nasx train``'s summary with those a finished run already shows
(:func:`run_verdicts`). A numpy-free leaf, so that the CLI can print them without loading a model.
"""
from __future__ import annotations

from typing import Any

EVALUATION_DOCS = "docs/evaluation.md"
METHOD_DOCS = "docs/method.md"
DISTINCT_SHARE = 0.8     # fewer distinct prototypes than this share of them: duplicates are poor
OWN_CLASS_SHARE = 0.9    # the predicted class's own prototypes carry at least this median share of its evidence
MIN_PER_CLASS = 2        # classes with fewer prototypes have little or no evidence of their own


def verdict(measure: str, poor: bool | None, says: str, see: str) -> dict[str, Any]:
    """``poor``: True poor, False fine, None inconclusive; ``see``: the docs' page and section."""
    word = {True: "poor", False: "fine", None: "inconclusive"}[poor]
    return {"measure": measure, "verdict": word, "says": says, "see": see}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def duplicates_verdict(distinct: int, count: int) -> dict[str, Any]:
    """Prototypes projected onto the same training patch show the same evidence several times."""
    poor = distinct / max(count, 1) < DISTINCT_SHARE
    return verdict("duplicates", poor, f"{distinct} distinct prototypes of {count}", f"{EVALUATION_DOCS}#prototype-set")


def thin_classes_verdict(per_class: dict[str, int]) -> dict[str, Any] | None:
    """Classes left with fewer than two prototypes by the global projection (eq. 9); None when there are none."""
    thin = [f"{name} ({n})" for name, n in per_class.items() if n < MIN_PER_CLASS]
    if not thin:
        return None
    return verdict("prototypes per class", True, f"classes with fewer than two prototypes: {', '.join(thin[:10])}"
                   f"{', ...' if len(thin) > 10 else ''}", f"{EVALUATION_DOCS}#prototype-set")


def labels_verdict(mislabelled: int) -> dict[str, Any] | None:
    """Prototypes whose largest last-layer weight is to another class than theirs; None when there are none."""
    if not mislabelled:
        return None
    return verdict("prototype labels", True, f"{mislabelled} prototypes vote for a class other than the one they "
                   "are shown with", f"{EVALUATION_DOCS}#evidence")


def cell_verdict(convolutions: int, edges: int) -> dict[str, Any] | None:
    """A collapsed normal cell (fewer than 2 convolutions: R-DARTS' failure mode); None otherwise."""
    if convolutions >= 2:
        return None
    return verdict("normal cell", True, f"collapsed: {convolutions} convolution(s) of {edges} edges, the rest pools "
                   "and skip connections", f"{METHOD_DOCS}#collapse")


def evaluation_verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdicts of ``nasx evaluate``'s report ``r``: the deletion gap (beyond two standard errors of 0), the
    alignment (inside-box gradient share against the box's area share: at most 1.25x is chance, 2x or more is
    fine), the own-class share of the evidence (median >= 90 %), labels that contradict the weights, duplicate
    prototypes (fewer than 80 % distinct) and classes with fewer than two prototypes."""
    out: list[dict[str, Any] | None] = []
    f, p, e = r.get("faithfulness"), r.get("prototypes"), r.get("evidence")
    if f:
        out += [_deletion_verdict(f["deletion"]), _alignment_verdict(f["alignment"])]
    if e and e["own_class_share"] is not None:
        median = e["own_class_share"]["median"]
        out.append(verdict("own-class evidence", median < OWN_CLASS_SHARE, f"the predicted class's own prototypes "
                           f"carry a median {_pct(median)} of its evidence", f"{EVALUATION_DOCS}#evidence"))
    if e:
        out.append(labels_verdict(len(e["mislabelled_prototypes"])))
    if p:
        out += [duplicates_verdict(p["duplicates"]["distinct"], p["count"]), thin_classes_verdict(p["per_class"])]
    return [v for v in out if v is not None]


def run_verdicts(report: dict[str, Any], distinct: int | None, convolutions: int | None,
                 edges: int) -> list[dict[str, Any]]:
    """The poor verdicts a finished training run already shows (``nasx evaluate`` measures the rest): labels
    that contradict the weights, classes with fewer than two prototypes, duplicate prototypes (``distinct``
    source patches; None: unknown) and a collapsed normal cell (``convolutions``; None: no searched cell)."""
    out = [labels_verdict(len(report.get("mislabelled_prototypes") or []))]
    if report.get("prototype_class_counts"):
        out.append(thin_classes_verdict(report["prototype_class_counts"]))
        if distinct is not None:
            out.append(duplicates_verdict(distinct, report["num_prototypes"]))
    if convolutions is not None:
        out.append(cell_verdict(convolutions, edges))
    return [v for v in out if v is not None and v["verdict"] == "poor"]


def _deletion_verdict(d: dict[str, Any]) -> dict[str, Any]:
    gap, se = d["area_gap"], d["area_gap_se"]
    poor = True if gap + 2 * se < 0 else False if gap - 2 * se > 0 else None
    says = {True: "hiding the evidence regions lowers the logit less than hiding random regions",
            False: "hiding the evidence regions lowers the logit more than hiding random regions",
            None: "the evidence regions and random regions are within two standard errors"}[poor]
    how = f" ({d['rule']} rule, {d['fill']} fill)" if "rule" in d else ""
    return verdict("deletion gap", poor, f"{says}{how} (gap {gap:.3f} +- {se:.3f})", f"{EVALUATION_DOCS}#faithfulness")


def _alignment_verdict(a: dict[str, Any]) -> dict[str, Any] | None:
    if not a["n"]:
        return None
    ratio = a["mass_in_box"] / max(a["box_share"], 1e-12)
    poor = True if ratio <= 1.25 else False if ratio >= 2 else None
    return verdict("alignment", poor, f"{_pct(a['mass_in_box'])} of the input gradient lies inside boxes covering "
                   f"{_pct(a['box_share'])} of the image ({ratio:.1f}x chance)", f"{EVALUATION_DOCS}#faithfulness")
