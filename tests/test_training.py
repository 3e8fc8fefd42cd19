"""Training for real, on tiny configurations: resumption is exact, the run directory holds what it
promises, and the data loaders and the config loader behave as documented."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import CIFAR10_MINI, read_jsonl, tiny_config, write_yaml

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from nasxserve.data import load_dataset  # noqa: E402
from nasxserve.errors import ConfigError, DataError  # noqa: E402
from nasxserve.nas.genotype import DARTS_V2, Genotype  # noqa: E402
from nasxserve.training.config import TrainConfig  # noqa: E402
from nasxserve.training.config_loading import config_from_dict, load_config  # noqa: E402


# ============================================================================ helpers

def assert_same(a: Any, b: Any, where: str = "", ignore: tuple[str, ...] = ("elapsed_s",)) -> None:
    """Deep equality, tensors bitwise (dtype, shape and every bit), ignoring keys in ``ignore``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        assert torch.equal(a, b), f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: dict vs {type(b).__name__}"
        ka, kb = set(a) - set(ignore), set(b) - set(ignore)
        assert ka == kb, (f"{where}: keys differ: only left {sorted(map(str, ka - kb))}, "
                          f"only right {sorted(map(str, kb - ka))}")
        for k in a:
            if k not in ignore:
                assert_same(a[k], b[k], f"{where}.{k}", ignore)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__}[{len(a)}] vs {b!r:.200}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", ignore)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_pt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def epoch_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "event" not in r]


TIMINGS = ("elapsed_s", "data_wait_share")   # wall-clock measurements: they differ from run to run


def without(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


# ============================================================================ resume is exact

def resume_config(synthetic_folder: Path) -> TrainConfig:
    """3 search epochs (one per stage) and 3 retrain epochs, projecting in every epoch that can, on the
    3-class synthetic folder (an epoch takes a couple of seconds)."""
    return load_config(None, tiny_config(
        data={"spec": f"imagefolder:{synthetic_folder}", "batch_size": 12, "eval_batch_size": 64,
              "train_portion": 0.5, "image_size": None},
        search={"epochs_adapt": 1, "epochs_joint": 1, "epochs_finetune": 1, "project_every": 1},
        retrain={"epochs_joint": 2, "epochs_finetune": 1, "project_every": 1},
        # the last-layer fit after each projection has its own random stream: more to restore
        projection={"last_layer_passes": 2}))


@pytest.fixture(scope="module")
def uninterrupted(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nasxserve.training.trainer import Trainer
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    Trainer.fresh(resume_config(synthetic_folder), str(out)).train()
    return out


def interrupt_and_resume(cfg: TrainConfig, out: Path, phase: str, epoch: int) -> dict[str, Any]:
    """Run until ``(phase, epoch)`` has been checkpointed, stop with Ctrl-C, then resume to the end."""
    from nasxserve.training.trainer import Trainer
    seen: list[tuple[str, int]] = []

    def hook(p: str, e: int) -> None:
        seen.append((p, e))
        if (p, e) == (phase, epoch):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer.fresh(cfg, str(out), on_epoch_end=hook).train()
    assert seen[-1] == (phase, epoch)
    ckpt = load_pt(out / "checkpoints" / "last.pt")
    assert (ckpt["phase"], ckpt["epoch"]) == (phase, epoch)
    assert not (out / "report.json").exists()
    return Trainer.resume(str(out)).train()


def assert_same_run(resumed: Path, reference: Path) -> None:
    # final weights, bitwise, tensor by tensor
    a, b = load_pt(resumed / "checkpoints" / "last.pt"), load_pt(reference / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, f"{len(differing)} of {len(b['model'])} tensors differ after resuming, e.g. {differing[:5]}"
    # ... and everything else in the checkpoints (optimizer state, projection log, counters)
    assert_same(a, b, "last.pt")
    assert_same(load_pt(resumed / "checkpoints" / "best.pt"), load_pt(reference / "checkpoints" / "best.pt"),
                "best.pt")

    ra = json.loads((resumed / "report.json").read_text())
    rb = json.loads((reference / "report.json").read_text())
    assert ra["test"] == rb["test"]
    assert ra["prototype_class_counts"] == rb["prototype_class_counts"]
    assert ra["genotype"] == rb["genotype"]

    # the log of the resumed run is the uninterrupted one: same rows in the same order, no duplicates
    ma, mb = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert len(ma) == len(mb), f"{len(ma)} metric rows after resuming, {len(mb)} without interruption"
    assert without(ma, *TIMINGS) == without(mb, *TIMINGS)
    steps = [r["step"] for r in epoch_rows(ma)]
    assert steps == list(range(1, len(steps) + 1))

    assert json.loads((resumed / "genotype.json").read_text()) == json.loads((reference / "genotype.json").read_text())
    assert (json.loads((resumed / "prototypes" / "records.json").read_text())
            == json.loads((reference / "prototypes" / "records.json").read_text()))
    pngs = sorted(p.name for p in (reference / "prototypes").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (resumed / "prototypes").glob("*.png"))
    for name in pngs:
        assert (resumed / "prototypes" / name).read_bytes() == (reference / "prototypes" / name).read_bytes(), name


@pytest.mark.slow
def test_uninterrupted_reference_run_is_complete(uninterrupted: Path):
    """The reference itself covers what the resume tests rely on: 3 + 3 epochs, projections in both phases."""
    rows = read_jsonl(uninterrupted / "metrics.jsonl")
    assert [(r["phase"], r["epoch"], r["stage"]) for r in epoch_rows(rows)] == [
        ("search", 1, "adapt"), ("search", 2, "joint"), ("search", 3, "finetune"),
        ("retrain", 1, "joint"), ("retrain", 2, "joint"), ("retrain", 3, "finetune")]
    events = [(r["phase"], r["epoch"]) for r in rows if r.get("event") == "projection"]
    # project_every 1: search stages 2-3 (the adaptation stage has no prototypes), every retrain epoch
    assert events == [("search", 2), ("search", 3), ("retrain", 1), ("retrain", 2), ("retrain", 3)]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["search", "retrain"])
def test_resume_is_exact(phase: str, synthetic_folder: Path, uninterrupted: Path, tmp_path: Path):
    """Interrupted after epoch 2 of the search or of the retrain, then resumed."""
    out = tmp_path / "resumed"
    report = interrupt_and_resume(resume_config(synthetic_folder), out, phase, 2)
    assert report["test"] == json.loads((uninterrupted / "report.json").read_text())["test"]
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_resume_after_an_interrupted_projection_drops_its_log_row(synthetic_folder: Path, uninterrupted: Path,
                                                                  tmp_path: Path):
    """Ctrl-C after a projection was logged but before its epoch was checkpointed: the resumed run
    redoes that epoch and its projection, and the log holds the row once."""
    from nasxserve.training.context import Reporter
    from nasxserve.training.trainer import Trainer

    class StopAtProjection(Reporter):
        def message(self, text: str) -> None:
            if text.startswith("projection (retrain, epoch 2)"):
                raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer.fresh(resume_config(synthetic_folder), str(out), reporter=StopAtProjection()).train()
    logged = read_jsonl(out / "metrics.jsonl")
    assert logged[-1].get("event") == "projection" and (logged[-1]["phase"], logged[-1]["epoch"]) == ("retrain", 2)
    assert (load_pt(out / "checkpoints" / "last.pt")["phase"], load_pt(out / "checkpoints" / "last.pt")["epoch"]) \
        == ("retrain", 1)
    Trainer.resume(str(out)).train()
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_resumed_report_equals_uninterrupted_report(synthetic_folder: Path, uninterrupted: Path, tmp_path: Path):
    """Everything in report.json but the wall time is the same whether or not the run was interrupted
    (including the search summary, when the interruption came during the retrain)."""
    out = tmp_path / "resumed"
    interrupt_and_resume(resume_config(synthetic_folder), out, "retrain", 1)
    ra = json.loads((out / "report.json").read_text())
    rb = json.loads((uninterrupted / "report.json").read_text())
    assert_same(ra, rb, "report", ignore=("wall_time_s",))


# ============================================================================ the CLI end to end

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory):
    """``nasx train --config tiny.yaml --out DIR -q`` on digits, once for the module."""
    from conftest import nasx_env, run_nasx
    root = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config()
    write_yaml(root / "tiny.yaml", cfg)
    proc = run_nasx(["train", "--config", "tiny.yaml", "--out", "run", "-q"], nasx_env(), root, timeout=600)
    return proc, root / "run", cfg


@pytest.mark.slow
def test_cli_train_exits_zero_and_prints_the_test_results(cli_run):
    proc, run, _ = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads((run / "report.json").read_text())
    assert json.loads(proc.stdout) == report["test"], "with -q, stdout is the report's test section as JSON"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "genotype.json", "metrics.jsonl",
                                                     "prototypes", "report.json"]


@pytest.mark.slow
def test_cli_run_config_and_genotype(cli_run):
    proc, run, cfg = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["search"]["channels"] == cfg["search"]["channels"] == 4
    assert saved["retrain"]["epochs_joint"] == cfg["retrain"]["epochs_joint"]
    assert saved["model"]["prototypes_per_class"] == 2
    assert saved["data"]["spec"] == "digits"
    assert load_config(run / "config.yaml").to_dict() == saved           # the saved config loads back as is

    g = json.loads((run / "genotype.json").read_text())
    genotype = Genotype.from_json((run / "genotype.json").read_text())
    assert genotype.to_dict() == g["genotype"]
    assert Genotype.from_darts_string(g["darts"]) == genotype
    report = json.loads((run / "report.json").read_text())
    assert report["genotype"] == g["genotype"]
    assert report["genotype_source"] == "search"
    last_search = [r for r in epoch_rows(read_jsonl(run / "metrics.jsonl")) if r["phase"] == "search"][-1]
    assert last_search["genotype"] == g["genotype"], "genotype.json is the genotype at the end of the search"


@pytest.mark.slow
def test_cli_run_metrics(cli_run):
    proc, run, cfg = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(run / "metrics.jsonl")
    epochs = epoch_rows(rows)
    s, r = cfg["search"], cfg["retrain"]
    n_search = s["epochs_adapt"] + s["epochs_joint"] + s["epochs_finetune"]
    n_retrain = r["epochs_joint"] + r["epochs_finetune"]
    assert len(epochs) == n_search + n_retrain
    assert [e["step"] for e in epochs] == list(range(1, n_search + n_retrain + 1))
    assert [(e["phase"], e["stage"]) for e in epochs] == (
        [("search", "adapt")] * s["epochs_adapt"] + [("search", "joint")] * s["epochs_joint"]
        + [("search", "finetune")] * s["epochs_finetune"]
        + [("retrain", "joint")] * r["epochs_joint"] + [("retrain", "finetune")] * r["epochs_finetune"])
    for e in epochs:
        assert 0.0 <= e["val_acc"] <= 1.0 and 0.0 <= e["train_acc"] <= 1.0
        assert np.isfinite(e["train_loss"]) and e["elapsed_s"] >= 0
    assert [e["elapsed_s"] for e in epochs] == sorted(e["elapsed_s"] for e in epochs)
    # first-epoch lr is the configured lr, then cosine-annealed downwards
    assert epochs[0]["lr"] == pytest.approx(0.025) and epochs[n_search]["lr"] == pytest.approx(0.05)

    events = [x for x in rows if x.get("event") == "projection"]
    # project_every 0 in the search: once at its end; every 2nd retrain epoch and at the end (epochs 2, 3)
    assert [(x["phase"], x["epoch"]) for x in events] == [("search", 3), ("retrain", 2), ("retrain", 3)]
    assert len(rows) == len(epochs) + len(events)
    m = 10 * cfg["model"]["prototypes_per_class"]
    for x in events:
        assert sum(x["class_counts"]) == m and len(x["class_counts"]) == 10
        assert x["mean_distance"] >= 0


@pytest.mark.slow
def test_cli_run_checkpoints(cli_run):
    proc, run, cfg = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = load_pt(run / "checkpoints" / "last.pt")
    best = load_pt(run / "checkpoints" / "best.pt")
    n_retrain = cfg["retrain"]["epochs_joint"] + cfg["retrain"]["epochs_finetune"]
    assert last["phase"] == "retrain" and last["epoch"] == n_retrain
    assert all(isinstance(v, torch.Tensor) for v in last["model"].values())
    assert best["model"].keys() == last["model"].keys()
    # best.pt: the best validation accuracy among retrain epochs that had been projected (epochs 2 and 3)
    retrain = [r for r in epoch_rows(read_jsonl(run / "metrics.jsonl")) if r["phase"] == "retrain"]
    projected = [r for r in retrain if r["epoch"] >= 2]
    top = max(r["val_acc"] for r in projected)
    assert best["val_acc"] == top
    assert best["epoch"] == next(r["epoch"] for r in projected if r["val_acc"] == top)
    assert last["best_val"] == top
    assert best["genotype"] == last["genotype"] == json.loads((run / "genotype.json").read_text())["genotype"]


@pytest.mark.slow
def test_cli_run_last_checkpoint_reproduces_the_reported_accuracy(cli_run):
    """Rebuild the network from genotype.json and config.yaml, load last.pt, evaluate on the test split."""
    from nasxserve.nas.network import GenotypeNetwork
    from nasxserve.protos.model import ExplainableNet
    from nasxserve.training.steps import evaluate
    proc, run, cfg = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_config(run / "config.yaml")
    data = load_dataset(saved.data.spec, saved.data.image_size)
    genotype = Genotype.from_json((run / "genotype.json").read_text())
    torch.manual_seed(0)
    model = ExplainableNet(GenotypeNetwork(genotype, saved.retrain.channels, saved.retrain.layers, data.in_channels,
                                           data.num_classes), data.num_classes, saved.model.prototypes_per_class,
                           saved.model.prototype_dim, saved.model.eps)
    model.load_state_dict(load_pt(run / "checkpoints" / "last.pt")["model"])
    model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, data.test, 512, torch.device("cpu"), channels_last=True)
    report = json.loads((run / "report.json").read_text())
    assert result.n == report["test"]["n"] == len(data.test) == 360
    # same weights and data; only the thread count may differ from the subprocess, so allow one flip
    assert abs(result.acc - report["test"]["prototype_acc"]) <= 1 / result.n + 1e-12
    assert abs(result.aux_acc - report["test"]["aux_acc"]) <= 1 / result.n + 1e-12


@pytest.mark.slow
def test_cli_run_prototypes_and_report(cli_run):
    proc, run, cfg = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    m = 10 * cfg["model"]["prototypes_per_class"]

    t = report["test"]
    for key in ("prototype_acc", "prototype_acc_before_projection", "prototype_acc_after_projection", "aux_acc"):
        assert isinstance(t[key], float) and 0.0 <= t[key] <= 1.0, key
    assert t["n"] == 360
    assert report["num_prototypes"] == m
    assert report["wall_time_s"] > 0
    assert report["data"]["sizes"] == {"train": 1078, "val": 359, "test": 360}
    assert report["data"]["image_size"] == [8, 8]

    # the report's accuracies are those logged around the final projection
    final = [x for x in read_jsonl(run / "metrics.jsonl") if x.get("event") == "projection"][-1]
    assert t["prototype_acc_before_projection"] == final["test_acc_before"]
    assert t["prototype_acc_after_projection"] == final["test_acc_after"]
    assert report["last_layer_after_projection"] == final["last_layer"] == "reconnect"
    assert t["prototype_acc"] == t["prototype_acc_after_last_layer"] == final["test_acc_after_last_layer"], \
        "the final model is the projected one after the last-layer fit"
    # every prototype supports the class it is labelled with, and the report says so
    assert report["mislabelled_prototypes"] == []
    last = load_pt(run / "checkpoints" / "last.pt")["model"]
    weight, labels = last["last_layer.weight"], last["prototype_layer.prototype_class"]
    own = weight[labels, torch.arange(m)]
    assert (own > 0).all() and (weight.argmax(0) == labels).all()
    assert report["classes_without_prototypes"] == [str(k) for k in range(10) if not (labels == k).any()]

    counts = report["prototype_class_counts"]
    assert list(counts) == [str(k) for k in range(10)]
    assert sum(counts.values()) == m
    assert list(counts.values()) == final["class_counts"]

    records = json.loads((run / "prototypes" / "records.json").read_text())["records"]
    assert len(records) == m
    assert [r["prototype"] for r in records] == list(range(m))
    by_class = Counter(r["source_class"] for r in records)
    assert {str(k): by_class.get(k, 0) for k in range(10)} == counts
    assert Counter(r["source_label"] for r in records) == Counter({k: v for k, v in counts.items() if v})
    from PIL import Image
    for r in records:
        x0, y0, x1, y1 = r["box_xyxy"]
        assert 0 <= x0 < x1 <= 8 and 0 <= y0 < y1 <= 8, r
        assert 0 <= r["sample"] < 1078 and r["distance"] >= 0
        with Image.open(run / "prototypes" / f"{r['prototype']:04d}.png") as patch:
            assert patch.size[0] * (y1 - y0) == patch.size[1] * (x1 - x0) and min(patch.size) >= 64
        with Image.open(run / "prototypes" / f"{r['prototype']:04d}_context.png") as ctx:
            assert min(ctx.size) >= 128
        x0, y0, x1, y1 = r["evidence_box_xyxy"]          # the evidence rule's box of the same source image
        assert 0 <= x0 < x1 <= 8 and 0 <= y0 < y1 <= 8, r
        with Image.open(run / "prototypes" / f"{r['prototype']:04d}_evidence.png") as patch:
            assert patch.size[0] * (y1 - y0) == patch.size[1] * (x1 - x0) and min(patch.size) >= 64
    assert len(list((run / "prototypes").glob("*.png"))) == 4 * m, "patch and context by each region rule"


# ============================================================================ search only, fixed genotype

@pytest.mark.slow
def test_cli_search_writes_a_genotype_and_no_report(nasx, tmp_path: Path, synthetic_folder: Path, tiny_yaml):
    out = tmp_path / "search_run"
    out.mkdir()                                   # an existing empty folder is a fine --out
    cfg = tiny_yaml(data={"spec": f"imagefolder:{synthetic_folder}", "batch_size": 12, "train_portion": 0.5,
                          "image_size": None})
    proc = nasx("search", "--config", cfg, "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    genotype = Genotype.from_json((out / "genotype.json").read_text())
    assert Genotype.from_json(proc.stdout) == genotype, "with -q, stdout is the genotype JSON"
    assert not (out / "report.json").exists()
    assert not (out / "prototypes").exists()
    rows = read_jsonl(out / "metrics.jsonl")
    assert {r["phase"] for r in rows} == {"search"}
    assert len(epoch_rows(rows)) == 3
    assert epoch_rows(rows)[-1]["genotype"] == genotype.to_dict()
    last = load_pt(out / "checkpoints" / "last.pt")
    assert (last["phase"], last["epoch"]) == ("search", 3)
    assert "features.alphas_normal" in last["model"] and "features.alphas_reduce" in last["model"]
    assert not (out / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_cli_train_with_published_genotype_skips_the_search(nasx, tmp_path: Path, tiny_yaml):
    out = tmp_path / "run"
    proc = nasx("train", "--config", tiny_yaml(), "--genotype", "DARTS_V2", "--retrain-epochs", "1,1",
                "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r for r in rows if r["phase"] == "search"] == []
    assert [(r["phase"], r["stage"]) for r in epoch_rows(rows)] == [("retrain", "joint"), ("retrain", "finetune")]
    report = json.loads((out / "report.json").read_text())
    assert report["genotype"] == DARTS_V2.to_dict()
    assert report["genotype_darts"] == DARTS_V2.to_darts_string()
    assert report["genotype_source"] == "DARTS_V2"
    assert report["search"] is None
    g = json.loads((out / "genotype.json").read_text())
    assert Genotype.from_json(json.dumps(g)) == DARTS_V2 and g["source"] == "DARTS_V2"
    assert yaml.safe_load((out / "config.yaml").read_text())["genotype"] == "DARTS_V2"
    assert "features.alphas_normal" not in load_pt(out / "checkpoints" / "last.pt")["model"]
    # the last layer is fitted after the final projection, and that is the model reported
    final = [r for r in rows if r.get("event") == "projection"][-1]
    assert (final["phase"], final["epoch"], final["last_layer"]) == ("retrain", 2, "reconnect")
    assert report["test"]["prototype_acc"] == final["test_acc_after_last_layer"]
    assert report["last_layer_after_projection"] == "reconnect"


def test_cli_train_logs_one_line_per_epoch_to_a_pipe(nasx, tmp_path: Path, tiny_yaml):
    """Written to a pipe or a file, as a cluster job's log is: no progress bars (their leftovers are blank
    lines) and every epoch on one line, however long it is."""
    proc = nasx("train", "--config", tiny_yaml(), "--genotype", "DARTS_V2", "--retrain-epochs", "1,1",
                "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert all(line.strip() for line in lines), proc.stderr
    epochs = [line for line in lines if line.startswith("retrain ")]
    assert len(epochs) == 2, proc.stderr
    assert all(re.fullmatch(r"retrain (joint|finetune) +[12]/2 loss \S+ train acc \S+ val acc \S+ aux \S+ "
                            r"\[\d+s(, ~\d+ (s|min) left in the retrain)?\]", line) for line in epochs), epochs
    assert "left in the retrain" in epochs[0] and "left" not in epochs[1]     # the last epoch has none left


def test_cli_search_prints_the_genotype_on_one_line_to_copy(nasx, tmp_path: Path, tiny_yaml):
    """The DARTS string is far wider than 80 columns; wrapped, it could not be pasted back into --genotype."""
    proc = nasx("search", "--config", tiny_yaml(search={"subset": 256}), "--search-epochs", "1,0,0",
                "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("genotype: "))
    searched = Genotype.from_json((tmp_path / "run" / "genotype.json").read_text())
    assert Genotype.from_darts_string(line.removeprefix("genotype: ")) == searched
    pasted = nasx("genotype", "show", line.removeprefix("genotype: "), "--json")   # as --genotype reads it
    assert pasted.returncode == 0, pasted.stderr[-3000:]
    assert Genotype.from_dict(json.loads(pasted.stdout)["genotype"]) == searched


def test_the_summary_flags_classes_left_without_prototypes_and_shared_source_patches(tmp_path: Path):
    from nasxserve.cli.train import _distinct_patches, _prototype_rows

    records = [{"sample": 7, "position": [1, 2]}, {"sample": 7, "position": [1, 2]},   # two on one patch
               {"sample": 7, "position": [2, 1]}, {"sample": 3, "position": [1, 2]}]
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"box_rule": "", "records": records}), encoding="utf-8")
    few = dict(_prototype_rows({"cat": 3, "dog": 0, "owl": 1}, _distinct_patches(path)))
    assert few["prototypes per class"] == '{"cat": 3, "dog": 0, "owl": 1}'
    assert str(few["classes without a prototype"]) == ("1 of 3: dog (--extension class-projection keeps every class "
                                                       "its own)")
    assert few["distinct source patches"] == "3 of 4 prototypes"

    many = {f"c{k:02d}": k % 4 for k in range(32)}                  # 8 classes with none: c00, c04, ..., c28
    rows = dict(_prototype_rows(many, _distinct_patches(tmp_path / "absent.json")))
    assert rows["prototypes per class"] == "min 0, median 1.5, max 3 over 32 classes"
    assert str(rows["classes without a prototype"]).startswith("8 of 32: c00, c04, c08, c12, c16, c20, c24, c28 (")
    assert "distinct source patches" not in rows
    rows = dict(_prototype_rows({f"c{k:02d}": 0 for k in range(11)}, _distinct_patches(path)))
    assert "c08, c09, ... (" in str(rows["classes without a prototype"])


# ============================================================================ data

@pytest.fixture(scope="module")
def cifar():
    if not CIFAR10_MINI.is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {CIFAR10_MINI} (expected ../shared/data/cifar10-mini "
                    f"next to the repository)")
    return load_dataset(f"imagefolder:{CIFAR10_MINI}")


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_imagefolder_cifar10_mini_shape(cifar):
    assert cifar.classes == CIFAR_CLASSES == sorted(CIFAR_CLASSES)
    assert cifar.num_classes == 10
    assert len(cifar.train) == 5000 and len(cifar.test) == 1000
    assert cifar.val is None
    assert cifar.in_channels == 3
    assert cifar.image_size == (32, 32)
    assert tuple(cifar.train.images.shape) == (5000, 3, 32, 32) and cifar.train.images.dtype == torch.uint8
    assert torch.bincount(cifar.train.labels, minlength=10).tolist() == [500] * 10
    assert torch.bincount(cifar.test.labels, minlength=10).tolist() == [100] * 10
    assert all(0.2 < m < 0.7 for m in cifar.mean) and all(0.1 < s < 0.4 for s in cifar.std)
    assert cifar.source == str(CIFAR10_MINI.resolve())


@pytest.mark.parametrize("split,per_class", [("train", 500), ("test", 100)])
def test_imagefolder_cifar10_mini_labels_match_folders(cifar, split, per_class):
    """Images are stored class by class in sorted order, files sorted: check pixels and labels of the
    first, a middle and the last file of every class against the PNGs read with PIL."""
    from PIL import Image
    images = getattr(cifar, split)
    for k, name in enumerate(CIFAR_CLASSES):
        files = sorted((CIFAR10_MINI / split / name).glob("*.png"))
        assert len(files) == per_class
        for j in (0, per_class // 2 + 7, per_class - 1):
            i = k * per_class + j
            with Image.open(files[j]) as im:
                expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            assert int(images.labels[i]) == k, (split, name, j)
            assert np.array_equal(images.images[i].numpy(), expected), f"{files[j]} != stored image {i}"
            assert np.array_equal(images.raw(i), expected.transpose(1, 2, 0))


def test_imagefolder_cifar10_mini_batches_are_normalised(cifar):
    x, y = cifar.train.batch(torch.arange(0, 5000, 50))
    assert x.dtype == torch.float32 and tuple(x.shape) == (100, 3, 32, 32)
    assert torch.equal(y, cifar.train.labels[::50])
    raw = cifar.train.images[::50].float() / 255.0
    mean = torch.tensor(cifar.mean).view(1, 3, 1, 1)
    std = torch.tensor(cifar.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std, atol=1e-6)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_sizes_and_shape(digits):
    sizes = (len(digits.train), len(digits.val), len(digits.test))
    assert sum(sizes) == 1797
    assert sizes == (1078, 359, 360)                      # 60 / 20 / 20
    assert digits.in_channels == 1 and digits.image_size == (16, 16)
    assert digits.classes == [str(k) for k in range(10)]
    for s in (digits.train, digits.val, digits.test):
        assert tuple(s.images.shape[1:]) == (1, 16, 16) and s.images.dtype == torch.uint8
    assert int(digits.train.images.max()) > 200            # 0..16 intensities were rescaled to 0..255


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits as sk_load_digits
    overall = np.bincount(sk_load_digits().target, minlength=10) / 1797
    for name in ("train", "val", "test"):
        labels = getattr(digits, name).labels.numpy()
        counts = np.bincount(labels, minlength=10)
        assert (counts > 0).all(), f"{name} lacks a class: {counts}"
        assert np.abs(counts / len(labels) - overall).max() < 0.01, (name, counts)
    total = sum(np.bincount(getattr(digits, n).labels.numpy(), minlength=10) for n in ("train", "val", "test"))
    assert (total == np.bincount(sk_load_digits().target, minlength=10)).all()


def test_digits_split_is_the_same_on_every_load(digits):
    again = load_dataset("digits")
    for name in ("train", "val", "test"):
        a, b = getattr(digits, name), getattr(again, name)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), name
    assert digits.mean == again.mean and digits.std == again.std


def test_digits_image_size_and_path_handling():
    small = load_dataset("digits", image_size=8)
    assert small.image_size == (8, 8) and len(small.train) == 1078
    with pytest.raises(DataError, match="takes no path"):
        load_dataset("digits:/some/where")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope")


# ============================================================================ config

def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"'search\.nonsense'") as e:
        load_config(None, {"search": {"nonsense": 1}})
    assert "channels" in str(e.value)                       # the valid keys of the section are listed
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(None, {"bogus": 1})
    with pytest.raises(ConfigError, match=r"'retrain\.chanels'"):
        config_from_dict({"retrain": {"chanels": 8}})


def test_config_yaml_overrides_defaults_and_flags_override_yaml(tmp_path: Path):
    path = write_yaml(tmp_path / "c.yaml", {"search": {"channels": 6, "arch_betas": [0.9, 0.99]},
                                            "seed": 3, "data": {"spec": "imagefolder:/x"}})
    cfg = load_config(path)
    default = TrainConfig()
    assert cfg.search.channels == 6 and default.search.channels == 8
    assert cfg.search.arch_betas == (0.9, 0.99)
    assert cfg.seed == 3
    assert cfg.data.spec == "imagefolder:/x"
    preset = load_config(None, {"data": {"spec": "imagefolder:/x"}})   # the defaults for this dataset
    assert cfg.search.layers == preset.search.layers           # untouched keys keep their preset values
    assert cfg.retrain == preset.retrain
    over = load_config(path, {"seed": 7, "search": {"layers": 2}})
    assert (over.seed, over.search.layers, over.search.channels) == (7, 2, 6)
    # what a run saves loads back to the same config
    assert config_from_dict(yaml.safe_load(over.to_yaml())) == over


@pytest.mark.parametrize("overrides,key", [
    ({"seed": "abc"}, "seed"),
    ({"search": {"channels": 2.5}}, "search.channels"),
    ({"data": {"batch_size": True}}, "data.batch_size"),
    ({"data": {"train_portion": "half"}}, "data.train_portion"),
    ({"search": {"arch_betas": ["a", "b"]}}, "search.arch_betas"),
    ({"seed": None}, "seed"),
])
def test_config_rejects_wrong_types(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,fragment", [
    ({"search": 5}, "must be a mapping"),
    ({"search": {"order": 3}}, "search.order"),
    ({"device": "tpu"}, "device"),
    ({"data": {"train_portion": 1.5}}, "train_portion"),
    ({"retrain": {"epochs_joint": 0, "epochs_finetune": 0}}, "at least one epoch"),
    ({"projection": {"last_layer": "keep"}}, "no longer exists"),
    ({"projection": {"last_layer_passes": 0}}, "last_layer_passes"),
    ({"search": {"reductions": 0}}, r"search\.reductions must be one of \(1, 2\)"),
    ({"retrain": {"reductions": 3}}, r"retrain\.reductions must be one of \(1, 2\)"),
])
def test_config_rejects_invalid_values(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {channels: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config(empty) == TrainConfig()


# ============================================================================ validation split

def test_a_dataset_without_a_validation_split_selects_on_a_held_out_share(synthetic_folder: Path, tmp_path: Path):
    from nasxserve.training.trainer import Trainer
    spec = f"imagefolder:{synthetic_folder}"
    for preset in ("cpu", "paper"):
        assert load_config(None, {"data": {"spec": spec}}, preset=preset).data.val_share == 0.1
    cfg = load_config(None, tiny_config(genotype="DARTS_V2", data={"spec": spec, "image_size": None}))
    Trainer.fresh(cfg, str(tmp_path / "run")).train()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {r["val_split"] for r in epoch_rows(rows)} == {"val"}
    assert all("val_acc_before" in r and "test_acc_before" not in r for r in rows if r.get("event") == "projection"
               and r["epoch"] < 3), "only the final projection looks at the test split"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["sizes"] == {"train": 42, "val": 6, "test": 24}      # 2 of each class's 16
    assert report["data"]["val_split"] == "0.1 of the training split, stratified, seed 0"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["val_share"] == 0.1


def test_ctrl_c_before_the_first_epoch_ends_leaves_a_run_that_the_printed_command_finishes(nasx, env, tmp_path: Path,
                                                                                          tiny_yaml):
    import shlex
    import shutil
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    args = ["train", "--config", str(tiny_yaml()), "--genotype", "DARTS_V2", "--retrain-epochs", "1,1",
            "--out", str(out)]
    # SIGINT as a terminal leaves it: a test runner started in the background (`cmd &` in a script) ignores SIGINT,
    # its children inherit that, and an ignored Ctrl-C would let the run finish
    proc = subprocess.Popen([sys.executable, "-m", "nasxserve", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "config.yaml").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert not (out / "checkpoints" / "last.pt").exists(), "interrupted too late: the first epoch had finished"
    unstarted = tmp_path / "unstarted"
    shutil.copytree(out, unstarted)
    hint = re.search(r"continue with: (nasx .+)", stdout + stderr)
    assert hint, stdout + stderr
    command = shlex.split(hint.group(1))
    assert command[:3] == ["nasx", "train", "--resume"]
    resumed = nasx(*command[1:])
    assert resumed.returncode == 0, (resumed.stderr[-3000:], sorted(str(p.relative_to(out)) for p in out.rglob("*")))
    assert (out / "report.json").is_file()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["phase"], r["epoch"]) for r in epoch_rows(rows)] == [("retrain", 1), ("retrain", 2)]
    # --out may also reuse a folder that holds only an unstarted run
    again = nasx(*args[:-1], unstarted)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (unstarted / "report.json").is_file()


def test_an_unstarted_run_is_one_without_checkpoints_whatever_partial_writes_an_interrupt_left(tmp_path: Path):
    from nasxserve.training.rundir import RunDir
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_text(run.config_path, "seed: 0\n")
    (run.root / "checkpoints" / ".last.pt.k2j4.tmp").write_bytes(b"cut short")
    (run.root / ".metrics.jsonl.x9.tmp").write_text("")
    assert run.unstarted()
    run.require_resumable()                       # started again from its config.yaml
    (run.root / "checkpoints" / "best.pt").write_bytes(b"")
    assert not run.unstarted()
    with pytest.raises(Exception, match="no checkpoints/last.pt"):
        run.require_resumable()
    (run.root / "checkpoints" / "best.pt").unlink()
    (run.root / "notes.md").write_text("mine")    # something of the user's: not an unstarted run to reuse
    assert not run.unstarted()
