"""The ``evidence`` region rule (:mod:`nasxserve.regions`) on the PyTorch model: what projection measures on the
prototypes' source images and ``nasx evaluate`` on the test images, with the same numpy rule the runtime uses."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from nasxserve.protos.model import ExplainableNet
from nasxserve.regions import evidence_batch, evidence_boxes


def similarities_of(model: ExplainableNet, device: torch.device,
                    batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a numpy function (B, C, H, W) -> (B, m) similarities s_j, in chunks of ``batch_size``."""
    @torch.no_grad()
    def similarities(x: np.ndarray) -> np.ndarray:
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size]).to(device)).protos.similarities.float()
                               .cpu().numpy() for i in range(0, len(x), batch_size)])
    return similarities


def evidence_region_boxes(model: ExplainableNet, x: np.ndarray, latent_hw: tuple[int, int], prototypes: np.ndarray,
                          batch_size: int, device: torch.device) -> np.ndarray:
    """The ``evidence`` rule's boxes of chosen prototypes, per image.

    Args:
        x: (B, C, H, W) normalised images; latent_hw: the model's (H', W') grid on them.
        prototypes: (B, n) int prototype ids per image.
    Returns:
        (B, n, 4) int64 exclusive boxes in the images' pixels.
    """
    image_hw = (int(x.shape[2]), int(x.shape[3]))
    batch = np.concatenate([evidence_batch(image, latent_hw) for image in x])        # B x (1 + G) images
    sims = similarities_of(model, device, batch_size)(batch).reshape(len(x), -1, model.prototype_layer.num_prototypes)
    boxes = [evidence_boxes(sims[b][:, prototypes[b]], latent_hw, image_hw) for b in range(len(x))]
    return np.asarray(boxes, dtype=np.int64).reshape(len(x), prototypes.shape[1], 4)
