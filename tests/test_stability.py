"""Stabilised DARTS: the DARTS-ADA trigger on constructed eigenvalue histories, and a search whose
eigenvalue is made to jump, which must roll back to the exact earlier state and raise the weight decay."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, tiny_config
from nasxserve.training import trainer as trainer_module
from nasxserve.training.config import config_from_dict
from nasxserve.training.hessian import EigenEstimate
from nasxserve.training.stability import EigenvalueMonitor, raised_weight_decay
from nasxserve.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trigger_follows_the_darts_ada_schedule():
    m = EigenvalueMonitor(window=5, ratio=1.3, lookback=4, start_epoch=10)
    # flat for 20 epochs: never
    assert all(m.add(1.0) is None for _ in range(20))
    # epochs 22.. jump to 2.0: at epoch 23 the window centred on epoch 21 (19..23) averages 1.4, 1.4x the
    # window centred on epoch 17; it fires then, back to epoch 17
    fired = [m.add(v) for v in (1.0, 2.0, 2.0, 2.0, 2.0)]
    assert fired[:2] == [None, None]
    rise = fired[2]
    assert rise.at_epoch == 23 and rise.to_epoch == 17
    assert m.local_average(21) == pytest.approx((1 + 1 + 1 + 2 + 2) / 5)
    assert rise.ratio == pytest.approx(1.4)


def test_no_trigger_before_the_start_epoch_or_on_slow_growth():
    early = EigenvalueMonitor(window=5, ratio=1.3, lookback=4, start_epoch=10)
    assert all(early.add(v) is None for v in [1.0] * 8 + [5.0] * 6)      # earlier epoch < 10 throughout
    slow = EigenvalueMonitor(window=1, ratio=1.3, lookback=1, start_epoch=1)
    assert all(slow.add(1.2 ** k) is None for k in range(30))           # 1.2x per epoch < 1.3x


def test_weight_decay_schedule():
    assert raised_weight_decay(3e-4, 10, 0.03) == pytest.approx(3e-3)
    assert raised_weight_decay(3e-3, 10, 0.03) == pytest.approx(0.03)
    assert raised_weight_decay(0.03, 10, 0.03) is None


def _scripted_eigenvalues(monkeypatch, values: list[float]) -> list[list[torch.Tensor]]:
    """Replace the estimate by ``values`` in call order; returns the alphas seen at each call."""
    seen: list[list[torch.Tensor]] = []

    def fake(losses, params, iterations=20, tolerance=1e-3, start=None, generator=None, reduce=None):
        seen.append([p.detach().clone() for p in params])
        return EigenEstimate(values[len(seen) - 1], [torch.ones_like(p) for p in params], 1, True)

    monkeypatch.setattr(trainer_module, "dominant_eigenvalue", fake)
    return seen


def _search(tmp_path: Path, weight_decay: float) -> tuple[Path, Trainer]:
    cfg = config_from_dict(tiny_config(search={
        "epochs_adapt": 2, "epochs_joint": 2, "epochs_finetune": 0, "weight_decay": weight_decay, "subset": 256,
        "stability": {"window": 1, "lookback": 1, "start_epoch": 1, "ratio": 1.3, "factor": 10.0,
                      "max_weight_decay": 0.03}}))
    out = tmp_path / "run"
    t = Trainer.fresh(cfg, str(out))
    t.search()
    return out, t


def test_a_jump_rolls_back_to_the_exact_earlier_state(monkeypatch, tmp_path: Path):
    # weight decay 0 stays 0 when "raised": the epoch after the rollback must then repeat bit for bit,
    # which holds only if weights, both optimisers' states and the epoch counter were all restored
    seen = _scripted_eigenvalues(monkeypatch, [1.0, 1.0, 9.0, 1.0, 1.0, 1.0])
    out, _ = _search(tmp_path, weight_decay=0.0)
    assert len(seen) == 5                                   # epochs 1, 2, 3, then 3 again and 4
    for first, again in zip(seen[2], seen[3]):
        assert torch.equal(first, again)
    rows = read_jsonl(out / "metrics.jsonl")
    events = [r for r in rows if r.get("event") == "regularisation"]
    assert len(events) == 1 and events[0]["at_epoch"] == 3 and events[0]["rolled_back_to"] == 2
    assert [r["epoch"] for r in rows if r.get("phase") == "search" and "event" not in r] == [1, 2, 3, 3, 4]


def test_a_jump_raises_the_weight_decay_and_is_recorded(monkeypatch, tmp_path: Path):
    _scripted_eigenvalues(monkeypatch, [1.0, 1.0, 9.0, 1.0, 1.0])
    out, trainer = _search(tmp_path, weight_decay=3e-4)
    rows = read_jsonl(out / "metrics.jsonl")
    event = next(r for r in rows if r.get("event") == "regularisation")
    assert event["weight_decay"] == pytest.approx(3e-3) and event["eigenvalue_ratio"] == pytest.approx(9.0)
    epochs = [r for r in rows if r.get("phase") == "search" and "event" not in r]
    assert [r["weight_decay"] for r in epochs] == pytest.approx([3e-4, 3e-4, 3e-4, 3e-3, 3e-3])
    assert [r["hessian_eigenvalue"] for r in epochs] == [1.0, 1.0, 9.0, 1.0, 1.0]
    assert all(set(r["skip_connections"]) == {"normal", "reduce"} for r in epochs)
    summary = trainer._search_summary()
    assert summary["epochs"] == 4 and summary["epochs_run"] == 5 and len(summary["regularisation"]) == 1
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["w_opt"]["param_groups"][0]["weight_decay"] == pytest.approx(3e-3)
    # only the snapshots a rollback could still need are kept (window 1 + lookback 1 -> the last two)
    assert sorted(p.name for p in (out / "checkpoints").glob("search-epoch-*.pt")) == \
        ["search-epoch-003.pt", "search-epoch-004.pt"]


def test_at_the_limit_the_search_carries_on(monkeypatch, tmp_path: Path):
    _scripted_eigenvalues(monkeypatch, [1.0, 1.0, 9.0, 90.0])
    out, _ = _search(tmp_path, weight_decay=0.03)
    rows = read_jsonl(out / "metrics.jsonl")
    events = [r for r in rows if r.get("event") == "regularisation"]
    assert len(events) == 1 and "rolled_back_to" not in events[0] and events[0]["weight_decay"] == 0.03
    assert [r["epoch"] for r in rows if r.get("phase") == "search" and "event" not in r] == [1, 2, 3, 4]
