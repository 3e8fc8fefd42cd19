"""The seam for this project's extensions (nasxserve.training.extensions): the core loop knows the seam only
and the extensions are built from their names; and the run context's CPU threads."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nasxserve.training.config import EXTENSION_NAMES, ExtensionsConfig  # noqa: E402
from nasxserve.training.context import cpu_threads  # noqa: E402
from nasxserve.training.extensions import (BoxCalibration, DeletionCost, build_extensions,  # noqa: E402
                                           extension_settings)

TRAINING = Path(__file__).resolve().parents[1] / "nasxserve" / "training"
CORE_LOOP = ("trainer.py", "context.py", "steps.py", "projection.py", "search.py", "retrain.py", "protopnet.py")


@pytest.mark.parametrize("module", CORE_LOOP)
def test_the_core_loop_names_no_extension(module):
    source = (TRAINING / module).read_text(encoding="utf-8")
    assert not re.findall(r"deletion|calibrat", source, flags=re.IGNORECASE)


def test_extensions_are_built_from_their_names_in_a_fixed_order():
    device = torch.device("cpu")
    assert build_extensions(ExtensionsConfig(), 64, device) == []
    built = build_extensions(ExtensionsConfig(enabled=["deletion-cost", "box-calibration"], deletion_cost=0.5), 64,
                             device)
    assert [type(e) for e in built] == [BoxCalibration, DeletionCost]
    assert [e.name for e in built] == list(EXTENSION_NAMES) and built[1].weight == 0.5
    assert extension_settings(built) == {"box_calibration": True, "deletion_cost": 0.5}
    assert extension_settings(build_extensions(ExtensionsConfig(enabled=["deletion-cost"]), 64, device)) == \
        {"deletion_cost": 2.0}


def test_a_cpu_run_takes_one_thread_unless_asked_and_a_gpu_run_keeps_torchs_default():
    assert cpu_threads(None, torch.device("cpu")) == 1
    assert cpu_threads(3, torch.device("cpu")) == 3
    assert cpu_threads(None, torch.device("cuda")) == torch.get_num_threads()
    assert cpu_threads(2, torch.device("cuda")) == 2
