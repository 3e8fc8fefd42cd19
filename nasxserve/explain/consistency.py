"""Whether a prototype model's evidence is what its labels say it is (numpy only, for the runtime too).

A prototype model's logit for class k is exactly ``sum_j w[k, j] * s_j`` (ProtoPNet's last layer h, NASXNet
figure 2). Prototype j is *labelled* class ``prototype_class[j]`` (the class of its source patch after
projection, eq. 9). The label is true when j supports that class: its largest last-layer weight is positive
and is the one to its own class, so that "prototype j (class c)" adds evidence for c and for no other class
more. :func:`mislabelled_prototypes` finds the ones for which this fails; ``nasx export`` refuses a bundle
with any, and ``nasx verify`` flags them.

:func:`own_class_share` measures how much of a logit its own class's prototypes carry: the share of the
absolute contributions ``|w[k, j] s_j|`` to logit k that come from prototypes labelled k. Near 1 a reader
can follow the prediction from the prototypes of the predicted class alone.
"""
from __future__ import annotations

import numpy as np


def supported_class(weight: np.ndarray) -> np.ndarray:
    """For each prototype, the class of its largest last-layer weight, or -1 when no weight is positive.

    Args:
        weight: (K, m) last-layer weights.
    Returns: (m,) int64.
    """
    weight = np.asarray(weight)
    best = weight.argmax(axis=0)
    return np.where(weight.max(axis=0) > 0, best, -1).astype(np.int64)


def mislabelled_prototypes(weight: np.ndarray, prototype_class: np.ndarray) -> np.ndarray:
    """Indices j (sorted) whose label is not the class they support: ``prototype_class[j]`` differs from
    :func:`supported_class` (a tie between the own class and another counts as not supporting it alone).

    Args:
        weight: (K, m) last-layer weights; prototype_class: (m,) labels.
    """
    weight = np.asarray(weight)
    prototype_class = np.asarray(prototype_class, dtype=np.int64)
    m = weight.shape[1]
    own = weight[prototype_class, np.arange(m)]
    others = np.where(np.arange(weight.shape[0])[:, None] == prototype_class[None, :], -np.inf, weight)
    return np.flatnonzero(~((own > 0) & (own > others.max(axis=0))))


def own_class_share(weight: np.ndarray, similarities: np.ndarray, classes: np.ndarray,
                    prototype_class: np.ndarray) -> np.ndarray:
    """Per image b, the share of the absolute contributions to logit ``classes[b]`` carried by prototypes
    labelled ``classes[b]``: ``sum_{j: c_j = k} |w[k, j] s_bj| / sum_j |w[k, j] s_bj|`` with k = classes[b]
    (NaN when every contribution is 0).

    Args:
        weight: (K, m); similarities: (B, m); classes: (B,) the class whose logit is explained (usually the
            predicted one); prototype_class: (m,).
    Returns: (B,) float64 in [0, 1].
    """
    weight = np.asarray(weight, dtype=np.float64)
    classes = np.asarray(classes, dtype=np.int64)
    contributions = np.abs(weight[classes] * np.asarray(similarities, dtype=np.float64))      # (B, m)
    own = np.asarray(prototype_class)[None, :] == classes[:, None]                              # (B, m)
    total = contributions.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (contributions * own).sum(axis=1) / total, np.nan)
