"""In-memory image sets and the splits a dataset provides."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from nasxserve.data.augment import Augmentation


class ImageSet:
    """Images held as uint8 (N, C, H, W) with int64 labels (N,); batches come out normalised float32.

    ``raw(i)`` returns the image as the model sees it before normalisation, (H, W, C) uint8, for
    rendering prototype patches.

    Annotations, where the dataset has them, are in pixels of the stored (cropped, resized) image:
    ``boxes`` float32 (N, 4) as x0, y0, x1, y1 (the object's box, clipped to the image), and
    ``parts`` float32 (N, P, 3) as x, y, visible (0 or 1; x = y = 0 where not visible).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                 boxes: np.ndarray | None = None, parts: np.ndarray | None = None):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError("images must be uint8 (N, C, H, W)")
        n = len(images)
        if boxes is not None and np.shape(boxes) != (n, 4):
            raise ValueError(f"boxes must be (N, 4) = ({n}, 4), got {np.shape(boxes)}")
        if parts is not None and (np.ndim(parts) != 3 or np.shape(parts)[0] != n or np.shape(parts)[2] != 3):
            raise ValueError(f"parts must be (N, P, 3) with N = {n}, got {np.shape(parts)}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float32)
        self.parts = None if parts is None else np.asarray(parts, dtype=np.float32)
        c = images.shape[1]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, augment: Augmentation | None = None, generator: torch.Generator | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """index: (b,) int64 -> (x (b, C, H, W) float32 normalised, y (b,) int64), on ``device`` (default:
        the CPU), augmented by ``augment`` with draws from ``generator`` when given.

        The uint8 pixels travel to the device (pinned, asynchronously, for CUDA) and are converted and
        augmented there, so a GPU does the augmentation."""
        x, y = self.images[index], self.labels[index]
        if device is not None and device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        x = x.to(torch.float32).div_(255.0)
        if augment is not None and augment.active:
            x = augment.geometric(x, generator)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        if augment is not None and augment.active:
            x = augment.erase(x, generator)
        return x, y

    @property
    def pixel_std(self) -> np.ndarray:
        """(C,) the normalisation's std per channel, as a share of the pixel range: one unit of a normalised
        image is this much of the range."""
        return self._std.flatten().numpy().astype(np.float64)

    def raw(self, i: int) -> np.ndarray:
        return self.images[i].permute(1, 2, 0).numpy()

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index: np.ndarray) -> ImageSet:
        out = ImageSet.__new__(ImageSet)
        out.images, out.labels = self.images[index], self.labels[index]
        rows = np.asarray(index)
        out.boxes = None if self.boxes is None else self.boxes[rows]
        out.parts = None if self.parts is None else self.parts[rows]
        out._mean, out._std = self._mean, self._std
        return out

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False, augment: Augmentation | None = None,
                augment_generator: torch.Generator | None = None, device: torch.device | None = None,
                shard: tuple[int, int] = (0, 1), with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches in order, or shuffled by ``generator``; augmentation draws from ``augment_generator``
        (a stream of its own, so that turning augmentation on does not change the order).

        ``shard`` = (rank, size): of every batch, only the rows :func:`shard_bounds` gives process ``rank``
        of ``size`` (all of them by default), so processes drawing the same order split each batch.
        ``with_index``: yield (x, y, index) instead, index (b,) int64 on the CPU the rows' positions in this
        set (what per-sample state, such as LeaSE's Delta, is kept by); the batches themselves are the same."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            lo, hi = shard_bounds(min(batch_size, stop - start), *shard)
            index = order[start + lo:start + hi]
            x, y = self.batch(index, augment, augment_generator, device)
            yield (x, y, index) if with_index else (x, y)

    def numbered_batch(self, number: int, batch_size: int,
                       device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``number`` (0-based) of the unshuffled batches of ``batch_size``, as :meth:`batch` gives it."""
        start = number * batch_size
        return self.batch(torch.arange(start, min(start + batch_size, len(self))), device=device)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows [start, stop) of ``n`` rows split over ``size`` processes: contiguous, in rank
    order, sizes differing by at most one (as ``torch.tensor_split``)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class Dataset:
    """A dataset's splits and what a model needs to know about its inputs."""

    name: str
    classes: list[str]
    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    source: str = ""
    part_names: list[str] | None = None   # names of ImageSet.parts' P entries, where the dataset has parts
    part_boxes: bool = False              # ImageSet.boxes mark the ground-truth discriminative part (shapes),
                                          # not the whole object
    val_held_out: float = 0.0             # > 0: val is this share of the dataset's training split (hold_out_validation)
    dark_background: bool = False         # objects drawn on a black background (digits): dark pixels are background

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    def summary(self) -> dict:
        return {
            "name": self.name, "source": self.source, "classes": self.classes,
            "image_size": list(self.image_size), "channels": self.in_channels,
            "mean": list(self.mean), "std": list(self.std),
            "sizes": {"train": len(self.train), "val": len(self.val) if self.val is not None else 0,
                      "test": len(self.test)},
            "val_split": ("none: the test split stands in" if self.val is None else
                          f"{self.val_held_out:g} of the training split, stratified, seed {VAL_SEED}"
                          if self.val_held_out else "the dataset's own"),
            "boxes": self.train.boxes is not None, "parts": self.part_names or [], "part_boxes": self.part_boxes,
        }


VAL_SEED = 0   # fixed, not the run's seed: every run of a dataset selects on the same validation images


def validation_rows(labels: np.ndarray, share: float, seed: int = VAL_SEED) -> np.ndarray:
    """Sorted rows of a stratified ``share`` of ``labels`` (N,): round(share x n_k) of each class's n_k rows, at
    most n_k - 1 so that every class keeps a training image, drawn by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = [np.zeros(0, dtype=np.int64)]
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        picked.append(rng.permutation(rows)[:min(int(round(share * len(rows))), len(rows) - 1)])
    return np.sort(np.concatenate(picked))


def hold_out_validation(dataset: Dataset, share: float) -> Dataset:
    """``dataset`` with a validation split carved out of its training split (:func:`validation_rows`) when it has
    none and ``share`` > 0, so that per-epoch accuracy, projection lines and best.pt never look at the test split;
    otherwise (or when the share rounds to no image in every class) ``dataset`` itself. Normalisation statistics
    stay those of the whole training split."""
    if dataset.val is not None or share <= 0:
        return dataset
    labels = dataset.train.labels.numpy()
    val = validation_rows(labels, share)
    if len(val) == 0:   # too few images a class for the share to take one: no split rather than an empty one
        return dataset
    train = np.setdiff1d(np.arange(len(labels)), val)
    return replace(dataset, train=dataset.train.subset(train), val=dataset.train.subset(val), val_held_out=share)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images scaled to [0, 1], rounded to 4 places."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(max(s, 1e-3)), 4) for s in std)
