"""The deletion cost (--extension deletion-cost, --deletion-cost) on models whose evidence is known by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import read_jsonl
from nasxserve.errors import ConfigError
from nasxserve.training.extensions import DeletionCost
from nasxserve.protos.losses import LossWeights, Stage, deletion_cost, stage_loss, top_evidence_boxes
from nasxserve.training.config_loading import load_config
from nasxserve.training.steps import weight_step
from test_metrics import BACKGROUND_SIM, EPS, SPOT_SIM, Pixels, Shifted, off_spot_model, spot_images, spot_model


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    images, blocks = spot_images(n)
    x, y = next(images.batches(n))
    return x, y, blocks


def test_occluding_a_box_that_holds_the_evidence_leaves_the_background():
    x, y, blocks = _batch()
    model = spot_model()
    protos = model(x).protos
    top, masks = top_evidence_boxes(model, protos, y, (20, 20))
    assert (top == 0).all()                                          # the white prototype is class 0's evidence
    for mask, (x0, y0, x1, y1) in zip(masks.numpy(), blocks):
        assert mask.sum() == (x1 - x0) * (y1 - y0) and mask[y0:y1, x0:x1].all()   # the box is the block
    # with the block occluded every pixel is black: distance 1 to the white prototype
    assert float(deletion_cost(model, x, y, protos).detach()) == pytest.approx(BACKGROUND_SIM, rel=1e-5)


def test_evidence_drawn_away_from_its_box_survives_the_occlusion():
    shift = Shifted(8)                     # the box lands 8 pixels right of and below the block it stands for
    x, y, blocks = _batch(40)
    whole = shift.keeps_whole(blocks)
    x, y = x[whole], y[whole]
    model = spot_model(shift)
    # the occluded box does not touch the block, which the shifted latent grid still shows whole
    assert float(deletion_cost(model, x, y, model(x).protos).detach()) == pytest.approx(SPOT_SIM, rel=1e-5)


class NormalisedPixels(nn.Module):
    """Pixels through a batch norm: a feature extractor with running statistics."""

    out_channels = 1

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(1, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_the_cost_trains_the_prototypes_and_leaves_batch_norm_statistics_alone():
    x, y, _ = _batch()
    model = off_spot_model(NormalisedPixels()).train()
    protos = model(x).protos
    norm = model.features.norm
    mean, var, seen = norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked)
    cost = deletion_cost(model, x, y, protos)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    assert int(norm.num_batches_tracked) == seen
    cost.backward()
    grad = model.prototype_layer.prototypes.grad.flatten()
    assert grad[0] != 0 and grad[1] == 0                  # only class 0's prototype was the top evidence


def test_weight_step_adds_lambda_times_the_cost_to_the_stage_loss():
    x, y, _ = _batch()
    model = off_spot_model(Pixels())
    weights = LossWeights()
    out = model(x)
    plain = stage_loss(Stage.FINETUNE, out, y, model.prototype_layer.prototypes, weights)
    expected = float((plain + 2.0 * deletion_cost(model, x, y, out.protos)).detach())
    # the block occluded, every pixel is at distance 1.5 ** 2 from the prototype at 1.5
    assert expected == pytest.approx(float(plain.detach()) + 2.0 * math.log(3.25 / (2.25 + EPS)), rel=1e-6)
    params = [model.prototype_layer.prototypes]
    cost = DeletionCost(2.0)
    loss, _ = weight_step(model, Stage.FINETUNE, x, y, torch.optim.SGD(params, lr=0.0), params, weights, clip=5.0,
                          extensions=[cost])
    assert loss == pytest.approx(expected, rel=1e-6)
    loss, _ = weight_step(model, Stage.FINETUNE, x, y, torch.optim.SGD(params, lr=0.0), params, weights, clip=5.0)
    assert loss == pytest.approx(float(plain.detach()), rel=1e-6)
    assert cost.loss_term(model, Stage.ADAPT, x, y, out) is None          # stage 1 trains no prototype


@pytest.mark.parametrize("overrides,fragment", [
    ({"extensions": {"enabled": ["deletion-cost"], "deletion_cost": -0.5}}, "must be > 0"),
    ({"extensions": {"enabled": ["deletion-cost"], "deletion_cost": 0.0}}, "must be > 0"),
    ({"extensions": {"enabled": ["deletion-cost"]}, "retrain": {"head": "linear"}}, "black box"),
    ({"extensions": {"enabled": ["deletion-cost"]}, "method": "protopnet"}, "ProtoPNet"),
    ({"extensions": {"enabled": ["deletion_cost"]}}, "unknown extension 'deletion_cost'"),
    ({"extensions": {"enabled": ["deletion-cost", "deletion-cost"]}}, "twice"),
])
def test_config_refuses_a_cost_with_nothing_to_train(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_cli_train_with_the_cost_records_it_and_runs_every_stage(nasx, tmp_path: Path, tiny_yaml):
    out = tmp_path / "run"
    proc = nasx("train", "--config", tiny_yaml(), "--genotype", "DARTS_V2", "--retrain-epochs", "1,1",
                "--extension", "deletion-cost", "--deletion-cost", "0.5", "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["extensions"] == {"enabled": ["deletion-cost"],
                                                                              "deletion_cost": 0.5}
    stages = [r["stage"] for r in read_jsonl(out / "metrics.jsonl") if r.get("phase") == "retrain" and "stage" in r]
    assert stages == ["joint", "finetune"]
    report = json.loads((out / "report.json").read_text())
    assert report["extensions"] == {"deletion_cost": 0.5} and report["test"]["prototype_acc"] > 0.0
    evaluated = nasx("evaluate", out, "--limit", "40")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Trained with the deletion cost (lambda 0.5; not in the papers)." in evaluated.stdout
    refused = nasx("train", "--config", tiny_yaml(), "--head", "linear", "--extension", "deletion-cost", "--out",
                   tmp_path / "linear")
    assert refused.returncode != 0 and "black box" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "linear").exists()
