"""scikit-learn's bundled 8x8 handwritten digits (UCI ML hand-written digits, 1,797 images, 10 classes).

The images are upsampled to 16x16 so that the network's two reduction cells leave a 4x4 latent grid,
and split once, stratified with a fixed seed, into train / val / test = 60 / 20 / 20.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from nasxserve.data.base import Dataset, ImageSet, channel_stats

SPLIT_SEED = 20240601


def load_digits(path: str | None = None, image_size: int = 16) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    raw = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)       # (N, 8, 8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR))
                       for im in raw])[:, None]                                  # (N, 1, S, S)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, rest = train_test_split(idx, test_size=0.4, stratify=labels, random_state=SPLIT_SEED)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=SPLIT_SEED)
    mean, std = channel_stats(images[train_idx])
    make = lambda ix: ImageSet(images[ix], labels[ix], mean, std)  # noqa: E731
    return Dataset(name="digits", classes=[str(i) for i in range(10)], train=make(train_idx),
                   val=make(val_idx), test=make(test_idx), mean=mean, std=std,
                   source="sklearn.datasets.load_digits", dark_background=True)
