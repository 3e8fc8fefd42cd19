"""Stabilised DARTS: the DARTS-ADA trigger on constructed eigenvalue histories, and a search whose
eigenvalue is made to jump, which must roll back to the exact earlier state and raise the weight decay."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_jsonl, tiny_config
from nasxserve.training import search_rollback
from nasxserve.training.config_loading import config_from_dict
from nasxserve.training.hessian import EigenEstimate
from nasxserve.training.search import search_summary
from nasxserve.training.stability import EigenvalueMonitor, raised_weight_decay
from nasxserve.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trigger_follows_the_darts_ada_schedule():
    m = EigenvalueMonitor(window=5, ratio=1.3, lookback=4, start_epoch=10)
    # flat for 20 epochs: never
    assert all(m.add(1.0, e) is None for e in range(1, 21))
    # epochs 22.. jump to 2.0: at epoch 23 the window centred on epoch 21 (19..23) averages 1.4, 1.4x the
    # window centred on epoch 17; it fires then, back to epoch 17
    fired = [m.add(v, e) for e, v in enumerate((1.0, 2.0, 2.0, 2.0, 2.0), start=21)]
    assert fired[:2] == [None, None]
    rise = fired[2]
    assert rise.at_epoch == 23 and rise.to_epoch == 17
    assert m.local_average(20) == pytest.approx((1 + 1 + 1 + 2 + 2) / 5)
    assert rise.ratio == pytest.approx(1.4)


def test_no_trigger_before_the_start_epoch_or_on_slow_growth():
    early = EigenvalueMonitor(window=5, ratio=1.3, lookback=4, start_epoch=10)
    values = [1.0] * 8 + [5.0] * 6
    assert all(early.add(v, e) is None for e, v in enumerate(values, start=1))   # earlier epoch <= 10 throughout
    slow = EigenvalueMonitor(window=1, ratio=1.3, lookback=1, start_epoch=1)
    assert all(slow.add(1.2 ** k, k + 1) is None for k in range(30))           # 1.2x per epoch < 1.3x


def test_every_second_epoch_looks_eight_epochs_back():
    """The reference's DARTS-ADA cadence: measured after epochs 1, 3, 5, ... and the last; a jump in the
    measurement after epoch 25 fires at once (the window centred on epoch 21 holds 17..25 and averages 1.4)
    and goes back to epoch 13, eight epochs before the window's centre."""
    m = EigenvalueMonitor(window=5, ratio=1.3, lookback=8, start_epoch=10, every=2)
    assert [e for e in range(1, 31) if m.due(e, final=e == 30)] == list(range(1, 30, 2)) + [30]
    fired = {e: m.add(1.0 if e < 25 else 3.0, e) for e in range(1, 26, 2)}
    assert all(r is None for e, r in fired.items() if e != 25)
    assert (fired[25].at_epoch, fired[25].to_epoch) == (25, 13)
    assert fired[25].ratio == pytest.approx(1.4)
    m.add(3.0, 27)
    m.add(3.0, 29)
    assert m.add(9.0, 30, final=True) is None            # never after the network's last epoch
    m.truncate(17)
    assert m.epochs == list(range(1, 18, 2)) and len(m.values) == 9
    assert EigenvalueMonitor(window=5, lookback=8, every=2, epochs=list(range(1, 22, 2))).oldest_rollback_target() == 9
    with pytest.raises(ValueError, match="multiple"):
        EigenvalueMonitor(lookback=5, every=2)


class _ReferenceEVLocalAvg:
    """automl/RobustDARTS src/utils.py EVLocalAvg.update and early_stop, transcribed (genotypes left out)."""

    def __init__(self, window: int, ev_freq: int, total_epochs: int):
        self.window, self.ev_freq, self.epochs = window, ev_freq, total_epochs
        self.stop_search, self.stop_epoch = False, total_epochs - 1
        self.ev, self.ev_local_avg, self.la_epochs = [], [], {}
        self.la_start_idx, self.la_end_idx = 0, window

    def update(self, epoch: int, ev: float) -> None:
        self.ev.append(ev)
        if len(self.ev) >= int(np.ceil(self.window / 2)) and epoch < self.epochs - 1:
            if len(self.ev) < self.window:
                self.ev_local_avg.append(np.mean(self.ev))
            else:
                self.ev_local_avg.append(np.mean(self.ev[self.la_start_idx:self.la_end_idx]))
                self.la_start_idx += 1
                self.la_end_idx += 1
            self.la_epochs[epoch] = int(epoch - int(self.ev_freq * np.floor(self.window / 2)))
        elif len(self.ev) < int(np.ceil(self.window / 2)):
            self.la_epochs[epoch] = -1

    def early_stop(self, epoch: int, factor: float, es_start_epoch: int, delta: int) -> None:
        if int(self.la_epochs[epoch] - self.ev_freq * delta) >= es_start_epoch:
            current_la, previous_la = self.ev_local_avg[-1], self.ev_local_avg[-1 - delta]
            self.stop_search = current_la / previous_la > factor
            if self.stop_search:
                self.stop_epoch = int(self.la_epochs[epoch] - self.ev_freq * delta)


@pytest.mark.parametrize("seed", range(12))
def test_the_trigger_agrees_with_the_r_darts_reference(seed):
    """Random positive eigenvalue histories with jumps: the first rollback (epoch seen, epoch returned to,
    counted as finished epochs) is the reference's (0-based epoch of ``train``'s loop, ``stop_epoch``) + 1,
    with its per-epoch loop: measured when ``epoch % report_freq_hessian == 0`` or last, compared unless
    last."""
    rng = np.random.default_rng(seed)
    every, window, start, epochs = [1, 2][seed % 2], [5, 3, 5][seed % 3], [10, 4][seed // 6], [30, 31, 50][seed % 3]
    history = np.exp(np.cumsum(rng.normal(0.0, 0.15, epochs) + (rng.random(epochs) < 0.08) * 0.8))
    delta = 4
    ref, expected = _ReferenceEVLocalAvg(window, every, epochs), None
    for epoch in range(epochs):
        if epoch % every == 0 or epoch == epochs - 1:
            ref.update(epoch, history[epoch])
            if epoch != epochs - 1:
                ref.early_stop(epoch, 1.3, start, delta)
                if ref.stop_search:
                    expected = (epoch + 1, ref.stop_epoch + 1)
                    break
    m = EigenvalueMonitor(window=window, ratio=1.3, lookback=delta * every, start_epoch=start, every=every)
    got = None
    for n in range(1, epochs + 1):
        if m.due(n, final=n == epochs):
            rise = m.add(history[n - 1], n, final=n == epochs)
            if rise is not None:
                got = (rise.at_epoch, rise.to_epoch)
                break
    assert got == expected


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

    monkeypatch.setattr(search_rollback, "dominant_eigenvalue", fake)
    return seen


def _search(tmp_path: Path, weight_decay: float, epochs_joint: int = 2, **stability) -> tuple[Path, Trainer]:
    cfg = config_from_dict(tiny_config(search={
        "epochs_adapt": 2, "epochs_joint": epochs_joint, "epochs_finetune": 0, "weight_decay": weight_decay,
        "subset": 256, "stability": {"window": 1, "lookback": 1, "start_epoch": 1, "ratio": 1.3, "factor": 10.0,
                                     "max_weight_decay": 0.03, **stability}}))
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
    summary = search_summary(trainer.ctx)
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


def test_measured_every_second_epoch_a_rollback_returns_to_a_measured_epoch(monkeypatch, tmp_path: Path):
    """Six epochs measured after 1, 3, 5 and the last; the jump seen after epoch 5 goes back to epoch 3
    (lookback 2) and epochs 4 and 5 run again. Only measured epochs are snapshotted."""
    seen = _scripted_eigenvalues(monkeypatch, [1.0, 1.0, 9.0, 1.0, 1.0])
    out, _ = _search(tmp_path, weight_decay=3e-4, epochs_joint=4, every=2, lookback=2, start_epoch=0)
    assert len(seen) == 5                                   # epochs 1, 3, 5, then 5 again and 6
    rows = read_jsonl(out / "metrics.jsonl")
    epochs = [r for r in rows if r.get("phase") == "search" and "event" not in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 4, 5, 6]
    assert [r["epoch"] for r in epochs if "hessian_eigenvalue" in r] == [1, 3, 5, 5, 6]
    event = next(r for r in rows if r.get("event") == "regularisation")
    assert (event["at_epoch"], event["rolled_back_to"]) == (5, 3)
    # snapshots only of measured epochs; at the end those a rollback could need (the last two measured)
    assert sorted(p.name for p in (out / "checkpoints").glob("search-epoch-*.pt")) == \
        ["search-epoch-005.pt", "search-epoch-006.pt"]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["eigenvalue_epochs"] == [1, 3, 5, 6] and ckpt["eigenvalues"] == [1.0, 1.0, 1.0, 1.0]
