"""Batch augmentation (crop-flip, affine-flip, Cutout), presets and training precision."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nasxserve.data.augment import (Augmentation, affine_matrices, cutout, default_padding, random_affine,
                                    random_crop, random_flip)
from nasxserve.data.base import ImageSet
from nasxserve.errors import ConfigError
from nasxserve.training.config import TrainConfig
from nasxserve.training.config_loading import load_config
from nasxserve.training.precision import Precision, resolve_precision


def _images(b=6, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_random_crop_is_the_padded_image_at_the_drawn_offsets():
    x, p = _images(), 2
    out = random_crop(x, p, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    top, left = torch.randint(0, 2 * p + 1, (6,), generator=g), torch.randint(0, 2 * p + 1, (6,), generator=g)
    padded = F.pad(x, (p, p, p, p))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, top[i]:top[i] + 8, left[i]:left[i] + 8])
    assert len({(int(t), int(u)) for t, u in zip(top, left)}) > 1      # offsets really vary
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_random_flip_mirrors_the_drawn_half():
    x = _images(b=32)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flip = torch.rand(32, generator=torch.Generator().manual_seed(1)) < 0.5
    for i in range(32):
        assert torch.equal(out[i], x[i].flip(2) if flip[i] else x[i])
    assert 0 < int(flip.sum()) < 32


def test_cutout_zeroes_one_clipped_square():
    x = torch.ones(64, 1, 10, 10)
    out = cutout(x, 4, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    cy, cx = torch.randint(0, 10, (64,), generator=g), torch.randint(0, 10, (64,), generator=g)
    for i in range(64):
        y0, y1 = max(int(cy[i]) - 2, 0), min(int(cy[i]) + 2, 10)
        x0, x1 = max(int(cx[i]) - 2, 0), min(int(cx[i]) + 2, 10)
        expected = torch.ones(10, 10)
        expected[y0:y1, x0:x1] = 0
        assert torch.equal(out[i, 0], expected)
    assert int((out == 0).sum(dim=(1, 2, 3)).max()) == 16        # an unclipped square is exactly 4 x 4


def test_affine_identity_quarter_turn_and_shear():
    x = _images(b=2, h=6, w=6)
    zero = torch.zeros(2)
    grid = F.affine_grid(affine_matrices(zero, zero), list(x.shape), align_corners=False)
    assert torch.allclose(F.grid_sample(x, grid, align_corners=False), x, atol=1e-6)
    quarter = affine_matrices(torch.full((2,), 90.0), zero)
    grid = F.affine_grid(quarter, list(x.shape), align_corners=False)
    # a quarter turn maps pixel centres onto pixel centres: out[i, j] = in[j, W - 1 - i]
    assert torch.allclose(F.grid_sample(x, grid, align_corners=False), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    sheared = affine_matrices(zero[:1], torch.tensor([30.0]))[0]
    assert torch.allclose(sheared, torch.tensor([[1.0, math.tan(math.radians(30)), 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(random_affine(x, 0.0, 0.0, torch.Generator()), x, atol=1e-6)


def test_augmentation_is_reproducible_and_does_not_change_the_batch_order():
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), np.arange(40) % 4,
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    aug = Augmentation("crop-flip", padding=2, cutout=3)

    def run(augment):
        return list(images.batches(16, True, torch.Generator().manual_seed(9), drop_last=True, augment=augment,
                                   augment_generator=torch.Generator().manual_seed(10)))

    plain, first, again = run(None), run(aug), run(aug)
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in first]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(plain, first))
    # Cutout happens after normalisation: the holes read 0, the dataset mean
    assert all(int((x == 0).sum()) >= 16 * 3 for x, _ in first)
    with pytest.raises(ValueError, match="crop-flip"):
        Augmentation("jitter")


def test_default_padding_scales_with_the_image():
    assert default_padding(32) == 4 and default_padding(16) == 2 and default_padding(224) == 28


# ----------------------------------------------------------------------------- presets

def test_cpu_preset_is_the_default_and_leaves_digits_alone():
    assert load_config().to_dict() == TrainConfig().to_dict()
    cifar = load_config(None, {"data": {"spec": "cifar10:/data"}})
    assert (cifar.preset, cifar.data.augment, cifar.search.subset) == ("cpu", "crop-flip", 640)
    # the cpu searches keep two convolutions in the normal cell; the papers' derivation has no floor
    assert (load_config().search.min_convolutions, cifar.search.min_convolutions) == (2, 2)


def test_paper_preset_has_the_published_settings():
    cfg = load_config(None, {"data": {"spec": "cifar10:/data"}}, preset="paper")
    s, r = cfg.search, cfg.retrain
    assert (s.channels, s.layers, cfg.data.batch_size, s.lr, s.momentum, s.weight_decay, s.arch_lr) == \
        (16, 8, 64, 0.025, 0.9, 3e-4, 3e-4)
    assert (s.epochs_adapt, s.epochs_joint, s.epochs_finetune) == (5, 40, 5)
    assert (r.layers, r.channels, r.batch_size, r.epochs_joint + r.epochs_finetune) == (20, 36, 96, 600)
    assert (r.auxiliary_tower, r.cutout, r.drop_path, cfg.data.augment) == (0.4, 16, 0.2, "crop-flip")
    cub = load_config(None, {"data": {"spec": "cub200:/data"}, "preset": "paper"})
    assert (cub.data.image_size, cub.data.crop, cub.data.augment) == (224, "bbox", "affine-flip")
    # eq. (2)'s unrolled gradient, projections every t = 10 epochs, ProtoPNet's 128-channel prototypes
    assert (s.order, s.project_every, r.project_every, s.min_convolutions) == (2, 10, 10, 0)
    assert (cfg.model.prototypes_per_class, cfg.model.prototype_dim) == (10, 128)
    # DARTS-ADA as R-DARTS' reference runs it: every second epoch, local averages compared 8 epochs apart
    st = s.stability
    assert (st.track, st.adaptive, st.every, st.window, st.lookback, st.start_epoch, st.ratio) == \
        (True, True, 2, 5, 8, 10, 1.3)
    assert (st.factor, st.max_weight_decay, st.batch_size) == (10.0, 0.03, 64)


def test_paper_preset_prints_its_resolved_config(nasx, tmp_path: Path):
    """--print-config writes the YAML a run would save and exits without training or writing anything."""
    import yaml

    for command in ("train", "search"):
        proc = nasx(command, "--preset", "paper", "--data", "cifar10:/no/such/folder", "--print-config", timeout=120)
        assert proc.returncode == 0, proc.stderr
        cfg = yaml.safe_load(proc.stdout)
        assert (cfg["preset"], cfg["search"]["order"], cfg["model"]["prototype_dim"]) == ("paper", 2, 128)
        assert (cfg["search"]["project_every"], cfg["retrain"]["project_every"]) == (10, 10)
        assert (cfg["search"]["stability"]["every"], cfg["search"]["stability"]["lookback"]) == (2, 8)
    flags = nasx("search", "--preset", "paper", "--order", "1", "--print-config", timeout=120)
    assert yaml.safe_load(flags.stdout)["search"]["order"] == 1          # flags still override the preset
    assert list(tmp_path.iterdir()) == []                                 # no run directory made


def test_preset_order_defaults_preset_file_flags(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: paper\ndata: {spec: 'cifar10:/data'}\nsearch: {layers: 6}\n", encoding="utf-8")
    cfg = load_config(path, {"search": {"channels": 12}})
    assert (cfg.preset, cfg.search.layers, cfg.search.channels, cfg.retrain.layers) == ("paper", 6, 12, 20)
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*cpu, paper"):
        load_config(None, {"preset": "fast"})
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(None, {"data": {"augment": "jitter"}})


# ----------------------------------------------------------------------------- precision

@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available")
def test_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu).dtype is None
    assert resolve_precision("bf16", cpu).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    bf16 = resolve_precision("auto", cuda, bf16_supported=True)
    assert (bf16.dtype, bf16.scaler, bf16.name) == (torch.bfloat16, None, "bf16")
    fp16 = resolve_precision("auto", cuda, bf16_supported=False)
    assert fp16.dtype is torch.float16 and fp16.scaler is not None and fp16.name == "fp16"
    with pytest.raises(ConfigError, match="no bf16 support"):
        resolve_precision("bf16", cuda, bf16_supported=False)
    assert resolve_precision("fp32", cuda).dtype is None


def test_autocast_runs_the_forward_in_bf16_and_fp32_is_untouched():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = _images(b=2)
    with Precision("cpu", torch.bfloat16).autocast():
        assert conv(x).dtype is torch.bfloat16
    with Precision("cpu").autocast():
        assert torch.equal(conv(x), conv(x)) and conv(x).dtype is torch.float32
