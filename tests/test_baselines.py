"""The two baselines of the NASXNet paper's Table 1 in nasx's pipeline: the black box (the genotype network
with a linear head, ``--head linear``) and ProtoPNet (``--method protopnet``): its costs, class-specific push,
schedule, resumption, ImageNet-weights loading, and the model description both rebuild from."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import yaml

from conftest import read_jsonl, tiny_config, write_yaml

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from nasxserve.data.base import ImageSet  # noqa: E402
from nasxserve.errors import BundleError, ConfigError, DataError  # noqa: E402
from nasxserve.nas.genotype import DARTS_V2  # noqa: E402
from nasxserve.protos.losses import (ProtoPNetWeights, class_separation_cost, cluster_cost,  # noqa: E402
                                     last_layer_l1, protopnet_loss)
from nasxserve.protos.model import ExplainableNet, ModelSpec, build_model, class_connection_init  # noqa: E402
from nasxserve.protos.projection import project_prototypes, save_projection  # noqa: E402
from nasxserve.training.config_loading import config_from_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def load_pt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ============================================================================ ProtoPNet's costs

# two images (classes 0 and 1), four prototypes (classes 0, 0, 1, 1)
MIN_D = torch.tensor([[1.0, 5.0, 2.0, 7.0],
                      [3.0, 0.5, 4.0, 6.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1])
PROTO_CLASS = torch.tensor([0, 0, 1, 1])
W = torch.tensor([[1.0, 2.0, -3.0, 4.0],
                  [-5.0, 6.0, 7.0, -8.0]], dtype=torch.float64)


def test_cluster_cost_is_the_mean_nearest_own_class_distance():
    # image 0: own prototypes 0, 1 -> min(1, 5) = 1; image 1: own prototypes 2, 3 -> min(4, 6) = 4
    assert cluster_cost(MIN_D, LABELS, PROTO_CLASS).item() == pytest.approx(2.5, abs=1e-12)


def test_separation_cost_is_the_mean_nearest_other_class_distance():
    # image 0: other prototypes 2, 3 -> min(2, 7) = 2; image 1: other prototypes 0, 1 -> min(3, 0.5) = 0.5
    assert class_separation_cost(MIN_D, LABELS, PROTO_CLASS).item() == pytest.approx(1.25, abs=1e-12)


def test_costs_send_gradient_to_the_winning_distance_only():
    d = MIN_D.clone().requires_grad_(True)
    cluster_cost(d, LABELS, PROTO_CLASS).backward()
    assert d.grad.tolist() == [[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]]


def test_l1_counts_only_connections_to_other_classes():
    # class 0's row: prototypes 2, 3 are other classes' -> 3 + 4; class 1's row: prototypes 0, 1 -> 5 + 6
    assert last_layer_l1(W, PROTO_CLASS).item() == 18.0
    assert last_layer_l1(class_connection_init(PROTO_CLASS, 2).double(), PROTO_CLASS).item() == 4 * 0.5


def test_protopnet_loss_is_ce_plus_08_cluster_minus_008_separation_plus_1e4_l1():
    logits = torch.zeros(2, 2, dtype=torch.float64)            # CE = log 2 for both images
    loss = protopnet_loss(logits, MIN_D, LABELS, PROTO_CLASS, W)
    assert loss.cross_entropy.item() == pytest.approx(math.log(2))
    assert loss.total.item() == pytest.approx(math.log(2) + 0.8 * 2.5 - 0.08 * 1.25 + 1e-4 * 18, abs=1e-12)
    other = protopnet_loss(logits, MIN_D, LABELS, PROTO_CLASS, W, ProtoPNetWeights(cluster=0, separation=1, l1=0))
    assert other.total.item() == pytest.approx(math.log(2) - 1.25, abs=1e-12)


# ============================================================================ class-specific projection

class PassThrough(nn.Module):
    out_channels = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _two_image_setup() -> tuple[ExplainableNet, ImageSet]:
    """Latent = pixels / 255 (no add-on). Image 0 (class 0) is all 0, image 1 (class 1) all 1. Prototype 0
    (class 0) sits at 0.9, next to class 1's image; prototype 1 (class 1) at 0.1, next to class 0's."""
    model = ExplainableNet(PassThrough(), num_classes=2, prototypes_per_class=1, prototype_dim=2)
    model.add_on = nn.Identity()
    with torch.no_grad():
        model.prototype_layer.prototypes.copy_(torch.tensor([0.9, 0.1]).view(2, 1, 1, 1).expand(2, 2, 1, 1))
    pixels = np.stack([np.zeros((2, 4, 4)), np.full((2, 4, 4), 255)]).astype(np.uint8)
    return model, ImageSet(pixels, np.array([0, 1]), mean=(0.0, 0.0), std=(1.0, 1.0))


def test_class_specific_projection_never_takes_another_class_patch(tmp_path: Path):
    model, images = _two_image_setup()
    records = project_prototypes(model, images, batch_size=1, class_specific=True)
    assert [(r.sample, r.source_class, r.class_before) for r in records] == [(0, 0, 0), (1, 1, 1)]
    # each prototype paid its distance to its own class's image: 2 x 0.9^2, not 2 x 0.1^2
    assert [r.distance for r in records] == pytest.approx([2 * 0.81, 2 * 0.81], rel=1e-5)
    assert model.prototype_layer.prototype_class.tolist() == [0, 1]
    assert model.prototype_layer.prototypes.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    save_projection(records, images, ["zero", "one"], tmp_path)
    saved = json.loads((tmp_path / "records.json").read_text())["records"]
    assert [r["source_label"] for r in saved] == ["zero", "one"]


def test_global_projection_takes_the_nearer_patch_of_another_class():
    model, images = _two_image_setup()
    records = project_prototypes(model, images, batch_size=1)
    assert [(r.sample, r.source_class, r.class_before) for r in records] == [(1, 1, 0), (0, 0, 1)]
    assert [r.distance for r in records] == pytest.approx([2 * 0.01, 2 * 0.01], rel=1e-4)
    assert model.prototype_layer.prototype_class.tolist() == [1, 0]


def test_class_specific_projection_needs_images_of_every_class():
    model, images = _two_image_setup()
    with pytest.raises(DataError, match=r"classes \[1\] have no image"):
        project_prototypes(model, images.subset(np.array([0])), batch_size=1, class_specific=True)


# ============================================================================ model description

def test_model_spec_round_trip_with_a_backbone():
    spec = ModelSpec(backbone="resnet18", small_input_stem=True, in_channels=1, num_classes=3,
                     prototypes_per_class=2, prototype_dim=4)
    d = spec.to_dict()
    assert d["genotype"] is None and d["backbone"] == "resnet18" and d["num_prototypes"] == 6
    assert ModelSpec.from_dict(json.loads(json.dumps(d))) == spec
    model = build_model(spec)
    assert model.aux_head is None and model.features.out_channels == 512
    assert model(torch.randn(2, 1, 32, 32)).protos.distances.shape == (2, 6, 4, 4)   # small stem: 32 -> 4
    trunk = sum(p.numel() for p in model.features.parameters())
    head = sum(p.numel() for m in (model.add_on, model.prototype_layer, model.last_layer) for p in m.parameters())
    assert model.prediction_parameters() == trunk + head


def test_model_spec_round_trip_with_a_genotype_and_old_dicts_load():
    spec = ModelSpec(genotype=DARTS_V2, channels=4, layers=3, in_channels=1, num_classes=10, prototypes_per_class=2,
                     prototype_dim=8, auxiliary_tower=True, head="linear")
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = {k: v for k, v in spec.to_dict().items() if k not in ("backbone", "small_input_stem", "head", "reductions")}
    assert ModelSpec.from_dict(old) == ModelSpec(**{**vars(spec), "head": "prototype"})
    one = ModelSpec(**{**vars(spec), "reductions": 1})
    assert ModelSpec.from_dict(json.loads(json.dumps(one.to_dict()))) == one
    assert build_model(one).eval().features(torch.zeros(1, 1, 16, 16)).shape[-2:] == (8, 8)
    model = build_model(spec)
    tower = sum(p.numel() for p in model.features.tower.parameters())
    assert tower > 0
    assert model.prediction_parameters("linear") == (sum(p.numel() for p in model.features.parameters()) - tower
                                                     + sum(p.numel() for p in model.aux_head.parameters()))
    with pytest.raises(ValueError, match="either a genotype or a backbone"):
        ModelSpec(in_channels=1, num_classes=2, prototypes_per_class=1, prototype_dim=2)


# ============================================================================ config and CLI mapping

@pytest.mark.parametrize("overrides,fragment", [
    ({"method": "protopnt"}, "method must be one of"),
    ({"method": "protopnet", "genotype": "DARTS_V2"}, "--genotype has no meaning for ProtoPNet"),
    ({"method": "protopnet", "retrain": {"head": "linear"}}, "ProtoPNet always predicts with prototypes"),
    ({"method": "protopnet", "protopnet": {"backbone": "swin_t"}}, "no convolutional trunk"),
    ({"method": "protopnet", "protopnet": {"backbone": "resnet9000"}}, "unknown backbone"),
    ({"retrain": {"head": "plain"}}, "retrain.head must be one of"),
    ({"protopnet": {"epochs_warm": 0, "epochs_joint": 0}}, "at least one epoch"),
])
def test_config_rejects_invalid_baseline_settings(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(overrides)


def test_cli_flags_map_to_the_baselines_config():
    from nasxserve.cli.train import _overrides

    o = _overrides(None, None, None, None, None, None, None, None, None, head="linear")
    assert o["search"]["head"] == "plain" and o["retrain"]["head"] == "linear"
    o = _overrides(None, None, None, None, None, None, None, None, None, head="plain")
    assert o == {"search": {"head": "plain"}}
    o = _overrides(None, None, None, None, None, None, "7,3", None, None, backbone="vgg11", epochs=10)
    assert o["method"] == "protopnet" and o["protopnet"] == {"backbone": "vgg11", "epochs_warm": 1, "epochs_joint": 9}
    assert o["retrain"] == {"epochs_joint": 7, "epochs_finetune": 3}
    assert _overrides(None, None, None, None, None, None, None, None, None, epochs=3)["protopnet"] == \
        {"epochs_warm": 1, "epochs_joint": 2}
    assert _overrides(None, None, None, None, None, None, None, None, None, epochs=25)["protopnet"] == \
        {"epochs_warm": 2, "epochs_joint": 23}
    assert "method" not in _overrides(None, None, None, None, None, None, None, None, None, epochs=25)
    o = _overrides(None, None, None, None, None, None, None, None, None, extension="box-calibration, deletion-cost",
                   deletion_cost=0.5)
    assert o == {"extensions": {"enabled": ["box-calibration", "deletion-cost"], "deletion_cost": 0.5}}
    assert _overrides(None, None, None, None, None, None, None, None, None, extension="") == \
        {"extensions": {"enabled": []}}
    for misuse in ({"deletion_cost": 1.0}, {"extension": "box-calibration", "deletion_cost": 1.0},
                   {"box_calibration": True}, {"box_calibration": False}):
        with pytest.raises(typer.BadParameter, match="--extension"):   # each points at the flag that names it
            _overrides(None, None, None, None, None, None, None, None, None, **misuse)
    assert _overrides(None, None, None, None, None, None, None, None, None) == {}


def test_protopnet_schedule_follows_main_py():
    from nasxserve.training.config import ProtoPNetConfig
    from nasxserve.training.protopnet import joint_lr_factor, pushes_after

    p = ProtoPNetConfig()
    # main.py: push when epoch >= 10 and epoch % 10 == 0; here also after the last epoch
    assert [e for e in range(30) if pushes_after(e, 30, p)] == [10, 20, 29]
    assert [e for e in range(5) if pushes_after(e, 5, p)] == [4]
    assert [e for e in range(6) if pushes_after(e, 6, ProtoPNetConfig(push_start=1, push_every=2))] == [1, 3, 5]
    # StepLR(5, 0.1) stepped before every joint epoch
    assert [joint_lr_factor(j, p) for j in range(11)] == pytest.approx([1] * 4 + [0.1] * 5 + [0.01] * 2)
    assert p.resolved_features_lr() == 1e-3
    assert ProtoPNetConfig(backbone_weights="w.pt").resolved_features_lr() == 1e-4


# ============================================================================ the black box (--head linear)

@pytest.fixture(scope="module")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nasxserve.training.trainer import Trainer

    out = tmp_path_factory.mktemp("linear") / "run"
    cfg = config_from_dict(tiny_config(genotype="DARTS_V2", retrain={"head": "linear", "epochs_joint": 1,
                                                                     "epochs_finetune": 1}))
    Trainer.fresh(cfg, str(out)).train()
    return out


def test_linear_head_run_reports_the_linear_head_and_no_prototypes(linear_run: Path):
    report = json.loads((linear_run / "report.json").read_text())
    assert report["head"] == "linear" and report["method"] == "nasxnet"
    t = report["test"]
    assert t["acc"] == t["aux_acc"] and 0.1 < t["acc"] <= 1.0 and t["n"] == 360
    assert t["prototype_acc"] is t["prototype_acc_before_projection"] is t["prototype_acc_after_projection"] is None
    assert report["prototype_class_counts"] is report["num_prototypes"] is None
    assert report["retrain_projections"] == [] and report["model"]["head"] == "linear"
    assert not (linear_run / "prototypes").exists()
    rows = read_jsonl(linear_run / "metrics.jsonl")
    assert [(r["phase"], r["stage"]) for r in rows] == [("retrain", "adapt")] * 2   # eq. (4), no projection rows
    assert all(r["val_acc"] == r["val_aux_acc"] for r in rows)
    best = load_pt(linear_run / "checkpoints" / "best.pt")
    assert best["val_acc"] == max(r["val_acc"] for r in rows)


def test_linear_head_run_test_acc_is_the_last_checkpoints_linear_head(linear_run: Path):
    from nasxserve.data import load_dataset
    from nasxserve.export.bundle import load_trained_run
    from nasxserve.training.steps import evaluate

    run = load_trained_run(linear_run)
    assert run.records == [] and run.spec.head == "linear"
    data = load_dataset("digits", 8)
    result = evaluate(run.model.to(memory_format=torch.channels_last), data.test, 512, torch.device("cpu"),
                      prototype_path=False, channels_last=True)
    report = json.loads((linear_run / "report.json").read_text())
    assert result.acc == report["test"]["acc"]
    # only f and h1 were trained: the prototype path is where it started
    torch.manual_seed(1)
    fresh = build_model(run.spec)
    assert torch.equal(fresh.prototype_layer.prototypes, run.model.prototype_layer.prototypes)
    assert not torch.equal(fresh.aux_head.weight, run.model.aux_head.weight)
    everything = sum(p.numel() for p in run.model.parameters())
    assert report["params"] == run.model.prediction_parameters("linear") < everything


def test_export_refuses_a_linear_head_run(linear_run: Path, tmp_path: Path):
    from nasxserve.export.bundle import export_bundle

    with pytest.raises(BundleError, match=r"black-box run \(--head linear\): it has no prototypes"):
        export_bundle(linear_run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


# ============================================================================ ProtoPNet

def protopnet_config(folder: Path, **protopnet: Any) -> dict[str, Any]:
    """ResNet-18 on the 3-class synthetic 8x8 folder (48 training images, batches of 12)."""
    return tiny_config(method="protopnet", data={"spec": f"imagefolder:{folder}", "batch_size": 12,
                                                 "eval_batch_size": 64, "image_size": None},
                       protopnet={"epochs_warm": 1, "epochs_joint": 1, "last_layer_iterations": 2, **protopnet})


def test_protopnet_step_minimises_the_protopnet_loss_of_the_batch(synthetic_folder: Path, tmp_path: Path):
    from nasxserve.training.protopnet import protopnet_step
    from nasxserve.training.trainer import Trainer

    trainer = Trainer.fresh(config_from_dict(protopnet_config(synthetic_folder)), str(tmp_path / "run"))
    model = trainer.model
    x, y = trainer.ctx.data.train.batch(torch.arange(12))
    layer = model.prototype_layer
    with torch.no_grad():
        out = model(x, aux_path=False)
        d = out.protos.min_distances
        expected = (F.cross_entropy(out.logits, y) + 0.8 * cluster_cost(d, y, layer.prototype_class)
                    - 0.08 * class_separation_cost(d, y, layer.prototype_class)
                    + 1e-4 * last_layer_l1(model.last_layer.weight, layer.prototype_class))
    params = list(model.add_on.parameters()) + [layer.prototypes]
    before = layer.prototypes.detach().clone()
    terms, _ = protopnet_step(model, x, y, torch.optim.Adam(params, lr=1e-3), params, trainer.pp_weights)
    assert terms["train_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert terms["l1"] == pytest.approx(3 * 4 * 0.5)   # eq. 8: each class's row has 4 links of -0.5 to others
    assert not torch.equal(before, layer.prototypes)


def _states_after_each_epoch(cfg: dict[str, Any], out: Path) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    from nasxserve.training.trainer import Trainer

    states: list[dict[str, torch.Tensor]] = []
    trainer = Trainer.fresh(config_from_dict(cfg), str(out),
                            on_epoch_end=lambda phase, epoch: states.append(
                                {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return initial, states


def test_protopnet_warm_up_freezes_the_features_and_joint_keeps_the_last_layer(synthetic_folder: Path,
                                                                              tmp_path: Path):
    # no last-layer steps after the final push, so every change to h would come from warm-up or joint
    initial, (warm, joint) = _states_after_each_epoch(
        protopnet_config(synthetic_folder, last_layer_iterations=0), tmp_path / "run")
    features = [k for k in initial if k.startswith("features.") and not k.endswith(("running_mean", "running_var",
                                                                                    "num_batches_tracked"))]
    assert features and all(torch.equal(initial[k], warm[k]) for k in features)
    assert not torch.equal(initial["add_on.0.weight"], warm["add_on.0.weight"])
    assert sum(not torch.equal(warm[k], joint[k]) for k in features) > len(features) // 2
    init_h = class_connection_init(torch.arange(6) // 2, 3)
    assert torch.equal(warm["last_layer.weight"], init_h) and torch.equal(joint["last_layer.weight"], init_h)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "event" not in r]
    assert [(r["stage"], r["features_lr"], r["lr"]) for r in rows] == [("warm", 0.0, 3e-3), ("joint", 1e-3, 3e-3)]


@pytest.fixture(scope="module")
def protopnet_reference(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """1 warm-up and 2 joint epochs, pushing after epochs 2 and 3, uninterrupted."""
    from nasxserve.training.trainer import Trainer

    cfg = protopnet_config(synthetic_folder, epochs_joint=2, push_start=1, push_every=1)
    out = tmp_path_factory.mktemp("protopnet") / "reference"
    Trainer.fresh(config_from_dict(cfg), str(out)).train()
    return cfg, out


def test_protopnet_run_directory(protopnet_reference: tuple[dict, Path]):
    _, out = protopnet_reference
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "prototypes",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert (report["method"], report["head"], report["backbone"]) == ("protopnet", "prototype", "resnet18")
    assert report["backbone_weights"] == "none: trained from scratch"
    assert report["test"]["aux_acc"] is None and report["test"]["acc"] == report["test"]["prototype_acc"]
    assert report["prototype_class_counts"] == {"class_0": 2, "class_1": 2, "class_2": 2}
    assert report["model"]["backbone"] == "resnet18" and report["model"]["small_input_stem"] is True
    rows = read_jsonl(out / "metrics.jsonl")
    pushes = [r for r in rows if r.get("event") == "projection"]
    assert [(p["epoch"], p["last_layer"]) for p in pushes] == [(2, "convex"), (3, "convex")]
    assert report["test"]["prototype_acc"] == pushes[-1]["test_acc_after_last_layer"]
    assert [r["stage"] for r in rows if "event" not in r] == ["warm", "joint", "joint"]
    records = json.loads((out / "prototypes" / "records.json").read_text())["records"]
    assert [r["source_class"] for r in records] == [r["class_before"] for r in records] == [0, 0, 1, 1, 2, 2]
    labels = load_labels(out)
    assert all(labels[r["sample"]] == r["source_class"] for r in records)


def load_labels(run: Path) -> list[int]:
    """The training split's labels of the run's dataset, as the run loaded it."""
    from nasxserve.data import load_dataset

    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    return load_dataset(data["spec"], data["image_size"], val_share=data["val_share"]).train.labels.tolist()


def test_protopnet_resume_is_exact(protopnet_reference: tuple[dict, Path], tmp_path: Path):
    from nasxserve.training.trainer import Trainer

    cfg, reference = protopnet_reference
    out = tmp_path / "resumed"

    def stop(phase: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer.fresh(config_from_dict(cfg), str(out), on_epoch_end=stop).train()
    assert load_pt(out / "checkpoints" / "last.pt")["epoch"] == 2
    resumed = Trainer.resume(str(out))
    assert type(resumed).__name__ == "ProtoPNetTrainer"
    resumed.train()
    for name in ("last.pt", "best.pt"):
        a, b = load_pt(out / "checkpoints" / name), load_pt(reference / "checkpoints" / name)
        differing = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
        assert not differing, f"{name}: {differing[:5]}"
    a, b = load_pt(out / "checkpoints" / "last.pt"), load_pt(reference / "checkpoints" / "last.pt")
    for opt in ("warm_opt", "joint_opt", "last_opt"):
        assert all(torch.equal(x, y) for s, t in zip(a[opt]["state"].values(), b[opt]["state"].values())
                   for x, y in zip(s.values(), t.values())), opt
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (out, reference))
    assert ra["test"] == rb["test"]
    assert (out / "prototypes" / "records.json").read_text() == (reference / "prototypes" / "records.json").read_text()
    strip = ("elapsed_s", "data_wait_share")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(out / "metrics.jsonl")]
            == [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(reference / "metrics.jsonl")])


def test_protopnet_refuses_bad_backbone_weights_before_writing(synthetic_folder: Path, tmp_path: Path):
    from nasxserve.training.trainer import Trainer

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read --backbone-weights .*bad.pt"):
        Trainer.fresh(config_from_dict(protopnet_config(synthetic_folder, backbone_weights=str(bad))),
                      str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    other = tmp_path / "vgg.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(ConfigError, match=r"not a state_dict of torchvision's resnet18: .* missing .*, "
                                          r"2 unexpected \(e\.g\. weight, bias\)"):
        Trainer.fresh(config_from_dict(protopnet_config(synthetic_folder, backbone_weights=str(other))),
                      str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer.fresh(config_from_dict(protopnet_config(synthetic_folder, backbone_weights=str(tmp_path / "no"))),
                      str(tmp_path / "run"))


def test_protopnet_loads_and_records_backbone_weights(synthetic_folder: Path, tmp_path: Path):
    import hashlib

    import torchvision

    from nasxserve.training.trainer import Trainer

    torch.manual_seed(123)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    trainer = Trainer.fresh(config_from_dict(protopnet_config(synthetic_folder, backbone_weights=str(path),
                                                              epochs_joint=0)), str(tmp_path / "run"))
    trunk = trainer.model.features.trunk.state_dict()
    assert torch.equal(trunk["layer3.1.conv2.weight"], source.state_dict()["layer3.1.conv2.weight"])
    assert torch.equal(trunk["bn1.running_var"], source.state_dict()["bn1.running_var"])
    assert trunk["conv1.weight"].shape == (64, 3, 3, 3)          # the small-input stem keeps its own
    report = trainer.train()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["backbone_weights"] == f"{path.resolve()} (sha256 {sha})"
    assert report["features_lr"] == 1e-4
    notes = report["backbone_weights_notes"]
    assert len(notes) == 1 and notes[0].startswith("conv1.weight not loaded: the small-input stem")


def test_protopnet_refuses_data_parallel(synthetic_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from nasxserve.training import protopnet
    from nasxserve.training.distributed import World
    from nasxserve.training.trainer import Trainer

    monkeypatch.setattr(protopnet, "current_world", lambda: World(0, 2))
    with pytest.raises(ConfigError, match="single process"):
        Trainer.fresh(config_from_dict(protopnet_config(synthetic_folder)), str(tmp_path / "run"))


# ============================================================================ end to end, from the CLI

@pytest.mark.slow
def test_cli_protopnet_on_digits_trains_pushes_and_exports(nasx, tmp_path: Path):
    """``nasx train --method protopnet --epochs 2`` (1 warm-up, 1 joint epoch, one push at the end) on digits,
    then ``nasx export`` of the run (ONNX only, parity checked)."""
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(protopnet={"last_layer_iterations": 2}))
    proc = nasx("train", "--config", cfg, "--method", "protopnet", "--epochs", "2", "--out", tmp_path / "run", "-q",
                timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert json.loads(proc.stdout) == report["test"]
    records = json.loads((tmp_path / "run" / "prototypes" / "records.json").read_text())["records"]
    m = 10 * 2
    assert [r["source_class"] for r in records] == [j // 2 for j in range(m)]   # the initial class blocks
    labels = load_labels(tmp_path / "run")
    assert all(labels[r["sample"]] == r["source_class"] for r in records)
    # each prototype's patch and context, by the activation and the evidence rule
    assert len(list((tmp_path / "run" / "prototypes").glob("*.png"))) == 4 * m
    proc = nasx("export", tmp_path / "run", "-o", tmp_path / "bundle", "--formats", "onnx", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["genotype"] is None and manifest["model"]["backbone"] == "resnet18"
    assert [p["class_index"] for p in manifest["prototypes"]] == [j // 2 for j in range(m)]
