"""The seam for this project's extensions (nasxserve.training.extensions): the core loop knows the seam only
and the extensions are built from their names; and the run context's CPU threads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from conftest import read_jsonl  # noqa: E402

from nasxserve.contracts import ExtensionSettings  # noqa: E402
from nasxserve.data.base import Dataset, ImageSet  # noqa: E402
from nasxserve.errors import ConfigError, DataError  # noqa: E402
from nasxserve.protos.projection import project_prototypes  # noqa: E402
from nasxserve.training.config import EXTENSION_NAMES, ExtensionsConfig  # noqa: E402
from nasxserve.training.context import cpu_threads  # noqa: E402
from nasxserve.training.extensions import (BoxCalibration, ClassProjection, DeletionCost,  # noqa: E402
                                           ForegroundProjection, build_extensions, projection_candidates,
                                           projects_within_class)

TRAINING = Path(__file__).resolve().parents[1] / "nasxserve" / "training"
CORE_LOOP = ("trainer.py", "context.py", "steps.py", "projection.py", "search.py", "retrain.py", "protopnet.py")


@pytest.mark.parametrize("module", CORE_LOOP)
def test_the_core_loop_names_no_extension(module):
    source = (TRAINING / module).read_text(encoding="utf-8")
    assert not re.findall(r"deletion|calibrat|foreground", source, flags=re.IGNORECASE)


def digits_like(n: int = 6) -> Dataset:
    """Black 8 x 8 images with one bright 4 x 4 quarter (quarter i % 4): objects on a dark background."""
    images = np.zeros((n, 1, 8, 8), np.uint8)
    for i in range(n):
        r, c = divmod(i % 4, 2)
        images[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 200
    labels = np.arange(n) % 2
    train = ImageSet(images, labels, (0.2,), (0.3,))
    return Dataset("dark", ["a", "b"], train=train, test=train, dark_background=True)


def test_extensions_are_built_from_their_names_in_a_fixed_order():
    device, data = torch.device("cpu"), digits_like()
    assert build_extensions(ExtensionsConfig(), data, 64, device) == []
    built = build_extensions(ExtensionsConfig(enabled=["foreground-projection", "deletion-cost", "class-projection",
                                                       "box-calibration"], deletion_cost=0.5), data, 64, device)
    assert [type(e) for e in built] == [BoxCalibration, ClassProjection, DeletionCost, ForegroundProjection]
    assert [e.name for e in built] == list(EXTENSION_NAMES) and built[2].weight == 0.5


def test_every_extension_is_recorded_under_its_name_and_deletion_cost_with_its_weight():
    record = ExtensionSettings(enabled=list(EXTENSION_NAMES), deletion_cost=0.5).record()
    assert record == {"box_calibration": True, "class_projection": True, "deletion_cost": 0.5,
                      "foreground_projection": True}
    assert ExtensionSettings(enabled=["deletion-cost"], deletion_cost=2.0).record() == {"deletion_cost": 2.0}
    assert ExtensionSettings(enabled=[], deletion_cost=2.0).record() == {}


def test_foreground_projection_needs_data_that_says_what_background_is():
    plain = digits_like()
    plain.dark_background = False
    with pytest.raises(ConfigError, match="foreground-projection.*says neither"):
        build_extensions(ExtensionsConfig(enabled=["foreground-projection"]), plain, 64, torch.device("cpu"))


def test_foreground_projection_takes_only_patches_on_the_object():
    from test_metrics import spot_model

    data = digits_like()
    model = spot_model().eval()            # the latent grid is the pixel grid: each patch is one pixel's block
    extension = ForegroundProjection(data, torch.device("cpu"))
    allowed = extension.projection_candidates(model, data.train)
    assert allowed is not None and allowed.shape == (6, 64)
    expected = torch.from_numpy(data.train.images.numpy()[:, 0].reshape(6, -1) > 0)
    assert torch.equal(allowed, expected)
    assert torch.equal(projection_candidates([extension], model, data.train), allowed)
    assert projection_candidates([], model, data.train) is None
    # class 1's prototype (-1.0) is nearest to a black pixel; held to the object, it must take a bright one
    free = project_prototypes(spot_model(), data.train)
    held = project_prototypes(spot_model(), data.train, allowed=allowed)
    assert data.train.images[free[1].sample, 0, free[1].position[0], free[1].position[1]] == 0
    for r in held:
        assert data.train.images[r.sample, 0, r.position[0], r.position[1]] > 0
    with pytest.raises(DataError, match="every patch was ruled out"):
        project_prototypes(spot_model(), data.train, allowed=torch.zeros(6, 64, dtype=torch.bool))


def test_class_projection_keeps_every_prototype_within_its_class():
    from test_metrics import spot_model

    data = digits_like()
    built = build_extensions(ExtensionsConfig(enabled=["class-projection"]), data, 64, torch.device("cpu"))
    assert projects_within_class(built) and not projects_within_class([])
    assert not projects_within_class(build_extensions(ExtensionsConfig(enabled=["box-calibration"]), data, 64,
                                                      torch.device("cpu")))
    labels = data.train.labels.numpy()
    # class 1's prototype (-1.0) is nearest to a black pixel, and sample 0, of class 0, has the first one
    free = project_prototypes(spot_model(), data.train)
    assert [labels[r.sample] for r in free] == [0, 0] and [r.source_class for r in free] == [0, 0]
    held = project_prototypes(spot_model(), data.train, class_specific=projects_within_class(built))
    assert [labels[r.sample] for r in held] == [0, 1] and [r.source_class for r in held] == [0, 1]


def test_cli_train_with_class_projection_keeps_every_class_its_prototypes(nasx, tmp_path: Path, tiny_yaml):
    out = tmp_path / "run"
    proc = nasx("train", "--config", tiny_yaml(), "--genotype", "DARTS_V2", "--retrain-epochs", "1,1",
                "--extension", "class-projection", "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    projections = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "projection"]
    assert projections and all(p["class_counts"] == [2] * 10 for p in projections)     # eq. (8)'s, every time
    assert all(p["reconnected_prototypes"] == 0 for p in projections)                  # none changed class
    report = json.loads((out / "report.json").read_text())
    assert report["extensions"] == {"class_projection": True}
    records = json.loads((out / "prototypes" / "records.json").read_text())
    assert all(r["source_class"] == r["class_before"] for r in records["records"])


def test_a_cpu_run_takes_one_thread_unless_asked_and_a_gpu_run_keeps_torchs_default():
    assert cpu_threads(None, torch.device("cpu")) == 1
    assert cpu_threads(3, torch.device("cpu")) == 3
    assert cpu_threads(None, torch.device("cuda")) == torch.get_num_threads()
    assert cpu_threads(2, torch.device("cuda")) == 2
