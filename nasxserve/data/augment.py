"""Training-time augmentation, applied to a whole batch at once on the device the batch lives on.

Two policies, as the papers' code bases use them:

- ``crop-flip`` (DARTS and its successors on CIFAR): zero-pad by ``padding`` pixels, take a random
  crop of the original size, flip left-right with probability 1/2.
- ``affine-flip`` (ProtoPNet on CUB-200-2011 and Stanford Cars, which augments with rotation, shear
  and flips): a random rotation in [-rotate, rotate] degrees and shear in [-shear, shear] degrees
  about the image centre, bilinear, zero fill; then the flip.

plus Cutout (DeVries and Taylor, 2017; DARTS retrains with a 16-pixel square), which zeroes a square
of the *normalised* image, i.e. sets it to the dataset mean, at a uniformly random centre, clipped at
the border.

Every random draw comes from the ``torch.Generator`` passed in (a CPU generator; the draws move to the
batch's device), so an epoch's augmentation is reproducible from its seed on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("none", "crop-flip", "affine-flip")


@dataclass(frozen=True)
class Augmentation:
    """A batch augmentation: ``policy`` (one of :data:`POLICIES`) and Cutout's square side (0 = off)."""

    policy: str = "none"
    padding: int = 4          # crop-flip: zero padding before the random crop
    rotate: float = 15.0      # affine-flip: most rotation, degrees
    shear: float = 10.0       # affine-flip: most shear, degrees
    cutout: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"augmentation policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")

    @property
    def active(self) -> bool:
        return self.policy != "none" or self.cutout > 0

    def geometric(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x: (B, C, H, W) float in [0, 1] -> the same shape, cropped/warped and flipped."""
        if self.policy == "crop-flip":
            x = random_crop(x, self.padding, generator)
        elif self.policy == "affine-flip":
            x = random_affine(x, self.rotate, self.shear, generator)
        if self.policy != "none":
            x = random_flip(x, generator)
        return x

    def erase(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x: (B, C, H, W) normalised -> Cutout applied (or x itself when cutout is 0)."""
        return cutout(x, self.cutout, generator) if self.cutout > 0 else x


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def _randint(n: int, high: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator).to(device)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, C, H, W): each image zero-padded by ``padding`` and cropped back at a
    uniformly random offset in [0, 2 * padding] on each axis."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = _randint(b, 2 * padding + 1, generator, x.device)
    left = _randint(b, 2 * padding + 1, generator, x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]        # (B, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]       # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices around a slice put the indexed dims first: (B, H, W, C)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """x: (B, C, H, W) -> each image mirrored left-right with probability 1/2."""
    flip = _uniform(len(x), 0.0, 1.0, generator, x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def affine_matrices(angle_deg: torch.Tensor, shear_deg: torch.Tensor) -> torch.Tensor:
    """(B,) rotation and shear angles in degrees -> (B, 2, 3) ``affine_grid`` matrices: a rotation
    composed with a horizontal shear about the centre, in the normalised [-1, 1] coordinates (so the
    warp is the same for any image size when H = W)."""
    a, s = torch.deg2rad(angle_deg), torch.deg2rad(shear_deg)
    cos, sin, tan = torch.cos(a), torch.sin(a), torch.tan(s)
    zero = torch.zeros_like(a)
    # [cos -sin; sin cos] @ [1 tan; 0 1]
    return torch.stack([torch.stack([cos, cos * tan - sin, zero], 1),
                        torch.stack([sin, sin * tan + cos, zero], 1)], 1)


def random_affine(x: torch.Tensor, rotate: float, shear: float, generator: torch.Generator | None) -> torch.Tensor:
    """x: (B, C, H, W) -> each image rotated by U(-rotate, rotate) and sheared by U(-shear, shear)
    degrees about its centre (bilinear, zeros outside)."""
    b = len(x)
    theta = affine_matrices(_uniform(b, -rotate, rotate, generator, x.device),
                            _uniform(b, -shear, shear, generator, x.device)).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """x: (B, C, H, W) -> a ``length`` x ``length`` square (clipped at the border) set to 0 in each image,
    centred on a uniformly random pixel."""
    b, _, h, w = x.shape
    cy, cx = _randint(b, h, generator, x.device), _randint(b, w, generator, x.device)
    half = length // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (ys[None] >= cy[:, None] - half) & (ys[None] < cy[:, None] + (length - half))   # (B, H)
    in_cols = (xs[None] >= cx[:, None] - half) & (xs[None] < cx[:, None] + (length - half))   # (B, W)
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]                                 # (B, 1, H, W)
    return x.masked_fill(hole, 0.0)


def default_padding(image_side: int) -> int:
    """The crop-flip padding for an image side: 4 pixels at CIFAR's 32, scaled with the side."""
    return max(1, int(math.ceil(image_side / 8)))
