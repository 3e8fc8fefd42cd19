"""Box calibration: move each prototype's box onto the input evidence its similarity rests on.

ProtoPNet's box (section 4.1; :mod:`nasxserve.boxes`) is drawn where a prototype's upsampled
similarity map is highest. That is where the latent patch sits, not necessarily where the pixels that made
the patch similar lie: a projected prototype is a copy of one training patch, and when that patch's part sat
beside its cell's centre, the prototype fires beside the part in every image, always on the same side
(Sacha et al., "Interpretability benchmark for evaluating spatial misalignment of prototypical parts
explanations", AAAI 2024, call this spatial misalignment). The offset belongs to the prototype, so it can be
measured once, on the training split, without any annotation:

    offset_j = median over the images x whose top evidence for their label is p_j of
               argmax_t sum_{pixels in box_j(x) + t} |sum_c x * d s_j(x) / d x|

the move t of the box drawn for p_j that makes it hold the most gradient x input of the prototype's
similarity s_j (its maximum over the map, eq. (2) of NASXNet), in whole pixels: the box a deletion test
would most want to occlude, to first order. Every box of p_j is then drawn moved by offset_j
(:func:`nasxserve.boxes.move_boxes`), at inference as at training, with no gradient needed there.
This is this project's extension, in neither paper; ``nasx evaluate``'s deletion test and localisation
measure whether the moved boxes hold more of the evidence than the plain ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nasxserve.data.base import ImageSet
from nasxserve.boxes import activation_boxes
from nasxserve.protos.model import ExplainableNet

MIN_IMAGES = 5       # a prototype that is the top evidence of fewer training images keeps offset 0
TIE = 1e-6           # placements within this share of the best sum tie; the box goes to their mean


def best_box_origins(saliency: torch.Tensor, sizes: np.ndarray) -> np.ndarray:
    """Where each image's box holds the most saliency.

    Args:
        saliency: (B, H, W) non-negative evidence per pixel.
        sizes: (B, 2) int (w, h) of each image's box, at most (W, H).
    Returns:
        (B, 2) float (x0, y0): the top-left corner of the w x h box with the largest saliency sum, the mean
        corner of all that tie for it (evidence smaller than the box leaves it centred on the evidence).
    """
    origins = np.zeros((len(saliency), 2))
    for w, h in np.unique(sizes, axis=0):
        same = np.flatnonzero((sizes[:, 0] == w) & (sizes[:, 1] == h))
        sums = F.avg_pool2d(saliency[same, None], (int(h), int(w)), stride=1)[:, 0].double()
        best = sums >= sums.flatten(1).amax(dim=1)[:, None, None] * (1 - TIE)
        ys, xs = torch.meshgrid(torch.arange(sums.shape[1], dtype=torch.float64, device=sums.device),
                                torch.arange(sums.shape[2], dtype=torch.float64, device=sums.device), indexing="ij")
        count = best.sum(dim=(1, 2))
        origins[same, 0] = ((best * xs).sum(dim=(1, 2)) / count).cpu().numpy()
        origins[same, 1] = ((best * ys).sum(dim=(1, 2)) / count).cpu().numpy()
    return origins


def evidence_offsets(model: ExplainableNet, images: ImageSet, batch_size: int = 128,
                     device: torch.device | str = "cpu", min_images: int = MIN_IMAGES) -> np.ndarray:
    """The calibrated box offset of every prototype (see the module's docstring).

    Args:
        model: the projected model; it is run in eval mode and left in the mode it was in.
        images: the split to measure on (the training split), with labels.
    Returns:
        (m, 2) int64 (dx, dy) pixels; (0, 0) for a prototype that is the top evidence for the label of fewer
        than ``min_images`` images, or whose similarity has no input gradient there.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    m = model.prototype_layer.num_prototypes
    tops, offsets = [], []
    for x, y in images.batches(batch_size, device=device):
        x = x.clone().requires_grad_(True)
        out = model(x, aux_path=False)
        rows = torch.arange(len(x), device=device)
        top = model.contributions(out.protos.similarities, y).argmax(dim=1)
        (grad,) = torch.autograd.grad(out.protos.similarities[rows, top].sum(), x)
        saliency = (grad * x).sum(dim=1).abs().detach().float()
        maps = out.protos.similarity_maps[rows, top].detach().float().cpu().numpy()
        boxes = np.asarray(activation_boxes(maps, (x.shape[2], x.shape[3])), dtype=np.int64).reshape(-1, 4)
        offsets.append(best_box_origins(saliency, boxes[:, 2:] - boxes[:, :2]) - boxes[:, :2])
        has_gradient = saliency.flatten(1).amax(dim=1).cpu().numpy() > 0
        tops.append(np.where(has_gradient, top.cpu().numpy(), -1))
    model.train(was_training)
    top_of, offset_of = np.concatenate(tops), np.concatenate(offsets)
    result = np.zeros((m, 2), dtype=np.int64)
    for j in range(m):
        mine = top_of == j
        if mine.sum() >= max(1, min_images):
            result[j] = np.rint(np.median(offset_of[mine], axis=0)).astype(np.int64)
    return result
