"""Box calibration: move each prototype's box onto the input evidence its similarity rests on.

ProtoPNet's box (section 4.1; :mod:`nasxserve.explain.boxes`) is drawn where a prototype's upsampled
similarity map is highest. That is where the latent patch sits, not necessarily where the pixels that made
the patch similar lie: a projected prototype is a copy of one training patch, and when that patch's part sat
beside its cell's centre, the prototype fires beside the part in every image, always on the same side
(Sacha et al., "Interpretability benchmark for evaluating spatial misalignment of prototypical parts
explanations", AAAI 2024, call this spatial misalignment). The offset belongs to the prototype, so it can be
measured once, on the training split, without any annotation:

    offset_j = median over the images x whose top evidence for their label is p_j of
               peak(G_sigma * |sum_c x * d s_j(x) / d x|) - centre(box_j(x))

the peak of the Gaussian-smoothed gradient x input of the prototype's similarity s_j (its maximum over the
map, eq. (2) of NASXNet) minus the centre of the box drawn for it, in whole pixels. Every box of p_j is then
drawn moved by offset_j (:func:`nasxserve.explain.boxes.shift_boxes`), at inference as at training, with no
gradient needed there. This is this project's extension, in neither paper; ``nasx evaluate``'s deletion test
and localisation measure whether the moved boxes hold more of the evidence than the plain ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nasxserve.data.base import ImageSet
from nasxserve.explain.boxes import activation_boxes
from nasxserve.protos.model import ExplainableNet

SIGMA_CELLS = 0.75   # smoothing of the gradient map, in latent cells (3 px at a 32 px image's stride of 4)
MIN_IMAGES = 5       # a prototype that is the top evidence of fewer training images keeps offset 0


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) maps blurred by a separable Gaussian of std ``sigma`` pixels (edges repeated)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[:, 0]


def evidence_peaks(saliency: torch.Tensor, sigma: float) -> np.ndarray:
    """(B, H, W) non-negative saliency -> (B, 2) float (x, y): the centre of the pixel where the smoothed
    saliency is largest (the first such pixel in row-major order)."""
    smoothed = gaussian_smooth(saliency, sigma)
    width = smoothed.shape[2]
    flat = smoothed.flatten(1).argmax(dim=1).cpu().numpy()
    return np.stack([flat % width, flat // width], axis=1) + 0.5


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) exclusive (x0, y0, x1, y1) -> (n, 2) (x, y) centres."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


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
        image_hw = tuple(x.shape[2:])
        sigma = SIGMA_CELLS * image_hw[1] / maps.shape[2]
        offset = evidence_peaks(saliency, sigma) - box_centres(activation_boxes(maps, image_hw))
        has_gradient = saliency.flatten(1).amax(dim=1).cpu().numpy() > 0
        tops.append(np.where(has_gradient, top.cpu().numpy(), -1))
        offsets.append(offset)
    model.train(was_training)
    top_of, offset_of = np.concatenate(tops), np.concatenate(offsets)
    result = np.zeros((m, 2), dtype=np.int64)
    for j in range(m):
        mine = top_of == j
        if mine.sum() >= max(1, min_images):
            result[j] = np.rint(np.median(offset_of[mine], axis=0)).astype(np.int64)
    return result
