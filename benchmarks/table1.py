"""NASXNet's Table 1 on any dataset: a black box, ProtoPNet and NASXNet trained at the same budget.

For every seed:
  1. NASXNet: ``nasx train`` (search, then retrain with prototypes) with the preset's settings;
  2. black box: the genotype NASXNet found, retrained for the same epochs with a linear head (``--head linear``);
  3. ProtoPNet: a torchvision backbone with ProtoPNet's objective and schedule (``--method protopnet``), for
     the same number of training epochs as NASXNet's retraining;
then ``nasx evaluate`` on each. It prints a markdown table (model, type, parameters, test accuracy,
duplicate prototype pairs, class purity; mean +- standard deviation over the seeds) and writes it, with
the command, the machine and every per-seed figure, to ``--results`` (markdown) and the same path with
``.json``.

    python benchmarks/table1.py --data digits --seeds 0,1,2
    python benchmarks/table1.py --data imagefolder:../shared/data/cifar10-mini --seeds 0

The search's epochs are NASXNet's alone: the other two models have no search. Training runs are kept in
``--work`` and reused when their report exists, so an interrupted table continues where it stopped.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("blackbox", "protopnet", "nasxnet")
ENV = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
LABELS = {"blackbox": ("Black box (same genotype, linear head)", "black box"),
          "protopnet": ("ProtoPNet", "prototype"),
          "nasxnet": ("NASXNet", "prototype")}


def nasx(*args: Any) -> list[str]:
    return [sys.executable, "-m", "nasxserve", *map(str, args)]


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; returns the wall time. A failure stops the table."""
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\nsee {log}")
    return time.perf_counter() - started


def retrain_epochs(run_dir: Path) -> int:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(cfg["retrain"]["epochs_joint"]) + int(cfg["retrain"]["epochs_finetune"])


def train(model: str, args: argparse.Namespace, seed: int, work: Path) -> Path:
    out = work / f"{model}-seed{seed}"
    if (out / "report.json").is_file():
        return out
    if out.exists():
        cmd = nasx("train", "--resume", out, "-q")
    else:
        common = ["--data", args.data, "--seed", seed, "--preset", args.preset, "--device", args.device, "--out", out, "-q",
                  *(["--threads", args.threads] if args.threads else [])]
        nasxnet = work / f"nasxnet-seed{seed}"
        if model == "nasxnet":
            cmd = nasx("train", *common, *args.nasxnet_args)
        elif model == "blackbox":
            cmd = nasx("train", *common, "--genotype", nasxnet / "genotype.json", "--head", "linear",
                       *args.nasxnet_args)
        else:
            weights = ["--backbone-weights", args.backbone_weights] if args.backbone_weights else []
            cmd = nasx("train", *common, "--method", "protopnet", "--backbone", args.backbone,
                       "--epochs", retrain_epochs(nasxnet), *weights)
    print(f"  train {model} seed {seed}: {shlex.join(map(str, cmd))}", file=sys.stderr, flush=True)
    run(cmd, work / f"{model}-seed{seed}.log")
    return out


def evaluate(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = run_dir / "evaluation.json"
    if not path.is_file():
        run(nasx("evaluate", run_dir, "--json-out", path, "--device", args.device, "-q"), run_dir / "evaluation.log")
    return json.loads(path.read_text())


def row_figures(model: str, run_dir: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    report = json.loads((run_dir / "report.json").read_text())
    acc = evaluation["accuracy"]
    protos = evaluation.get("prototypes")
    protocols = (evaluation.get("faithfulness") or {}).get("deletion_protocols") or []
    background = evaluation.get("background") or {}
    return {
        "model": model, "run": str(run_dir), "params": evaluation["model"]["params"],
        "accuracy": (acc.get("linear") or acc["prototype"])["top1"],
        "duplicates": protos["duplicates"]["pairs"] if protos else None,
        "distinct_prototypes": protos["duplicates"]["distinct"] if protos else None,
        "purity": protos["purity"]["mean"] if protos else None,
        # the deletion gap (random - MoRF area) and its 95% interval, per "rule/fill"
        "deletion": {f"{d['rule']}/{d['fill']}": {"gap": d["area_gap"], "ci95": d["area_gap_ci95"]} for d in protocols},
        "background_top_regions": background.get("top_regions"),
        "background_prototypes": background.get("prototypes"),
        "train_wall_s": report.get("wall_time_s"),
        "backbone_weights": report.get("backbone_weights"),
    }


PROTOCOLS = ("evidence/road", "evidence/mean", "activation/road", "activation/mean")   # the headline first


def mean_std(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} +- {format(statistics.stdev(values), fmt)}"


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| model | type | params | accuracy (%) | duplicate pairs | distinct prototypes | purity |",
             "|---|---|---|---|---|---|---|"]
    for model in MODELS:
        if model not in rows:
            continue
        rs = rows[model]
        name, kind = LABELS[model]
        lines.append(" | ".join([
            f"| {name}", kind, f"{statistics.mean(r['params'] for r in rs) / 1e6:.2f}M",
            mean_std([100 * r["accuracy"] for r in rs], ".1f"), mean_std([r["duplicates"] for r in rs], ".1f"),
            mean_std([r["distinct_prototypes"] for r in rs], ".1f"), mean_std([r["purity"] for r in rs], ".3f"),
        ]) + " |")
    return "\n".join(lines)


def evidence_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """The deletion gap by region rule and fill, and how much of the evidence lies on background."""
    lines = ["| model | " + " | ".join(f"gap {p.replace('/', ', ')}" for p in PROTOCOLS)
             + " | top region on background (evidence / activation) | prototypes on background |",
             "|---|" + "---|" * (len(PROTOCOLS) + 2)]
    pct = lambda values: mean_std([None if v is None else 100 * v for v in values], ".1f")  # noqa: E731
    for model in MODELS:
        rs = [r for r in rows.get(model, []) if r["deletion"]]
        if not rs:
            continue
        top = [r["background_top_regions"] or {} for r in rs]
        shares = " / ".join(pct([t.get(rule) for t in top]) for rule in ("evidence", "activation"))
        lines.append(" | ".join([f"| {LABELS[model][0]}",
                                 *(mean_std([r["deletion"][p]["gap"] for r in rs], ".2f") for p in PROTOCOLS),
                                 f"{shares} %",
                                 f"{pct([r['background_prototypes'] for r in rs])} %"]) + " |")
    return "\n".join(lines)


def budget(rows: dict[str, list[dict[str, Any]]]) -> str:
    """The training budget each model had, read back from the runs."""
    parts = []
    for model in MODELS:
        if model not in rows:
            continue
        cfg = yaml.safe_load((Path(rows[model][0]["run"]) / "config.yaml").read_text())
        if model == "protopnet":
            p = cfg["protopnet"]
            weights = rows[model][0]["backbone_weights"] or "none: trained from scratch"
            parts.append(f"ProtoPNet: {p['backbone']}, {p['epochs_warm']} warm-up + {p['epochs_joint']} joint epochs, "
                         f"backbone weights: {weights}.")
        else:
            r, se = cfg["retrain"], cfg["search"]
            epochs = r["epochs_joint"] + r["epochs_finetune"]
            if model == "nasxnet":
                search = se["epochs_adapt"] + se["epochs_joint"] + se["epochs_finetune"]
                parts.append(f"NASXNet: a search of {search} epochs, then {epochs} retrain epochs ({r['epochs_joint']} "
                             f"joint, {r['epochs_finetune']} fine-tune), C={r['channels']}, {r['layers']} cells.")
            else:
                parts.append(f"Black box: NASXNet's genotype of the same seed, {epochs} epochs.")
    return " ".join(parts)


def per_seed(rows: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| model | run | accuracy (%) | duplicate pairs | distinct | purity | gap evidence, road (95% interval) | "
             "gap activation, road (95% interval) | train wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731

    def gap(r: dict[str, Any], protocol: str) -> str:
        d = r["deletion"].get(protocol)
        return "-" if d is None else f"{d['gap']:.2f} ({d['ci95'][0]:.2f} to {d['ci95'][1]:.2f})"

    for model in MODELS:
        for r in rows.get(model, []):
            lines.append(f"| {LABELS[model][0]} | `{Path(r['run']).name}` | {100 * r['accuracy']:.1f} | "
                         f"{fmt(r['duplicates'], 'd')} | {fmt(r['distinct_prototypes'], 'd')} | {fmt(r['purity'], '.3f')} | "
                         f"{gap(r, 'evidence/road')} | {gap(r, 'activation/road')} | {fmt(r['train_wall_s'], '.0f')} |")
    return "Per run (wall times on a shared machine, two runs at a time with one thread each):\n\n" + "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "gpu": gpu, "date": dt.date.today().isoformat()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", help="NAME or NAME:PATH, as nasx train --data takes it")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS))
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (1 lets two tables share a 2-core machine without slowing each other)")
    p.add_argument("--backbone", default="resnet18", help="ProtoPNet's torchvision backbone")
    p.add_argument("--backbone-weights", default=None, help="ProtoPNet backbone weights file (default: from scratch)")
    p.add_argument("--nasxnet-args", default="", help="extra nasx train options for NASXNet and the black box, "
                                                      "e.g. '--epochs 10'")
    p.add_argument("--work", type=Path, default=None, help="where the runs go (default: runs/table1-<data>)")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file to write (default: benchmarks/results/table1-<data>.md)")
    args = p.parse_args()
    args.nasxnet_args = shlex.split(args.nasxnet_args)
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown or not seeds:
        p.error(f"--models takes {', '.join(MODELS)} and --seeds at least one seed (got {sorted(unknown)})")
    slug = args.data.split(":")[0] if ":" not in args.data else Path(args.data.split(":", 1)[1]).name
    work = args.work or ROOT / "runs" / f"table1-{slug}"
    work.mkdir(parents=True, exist_ok=True)
    results = args.results or ROOT / "benchmarks" / "results" / f"table1-{slug}.md"

    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        order = ["nasxnet"] + [m for m in models if m != "nasxnet"]   # the black box needs NASXNet's genotype
        for model in order:
            run_dir = train(model, args, seed, work)
            if model in models:
                rows.setdefault(model, []).append(row_figures(model, run_dir, evaluate(run_dir, args)))
    md = table(rows) + "\n\nThe evidence each prototype model shows (`nasx evaluate`):\n\n" + evidence_table(rows)
    print(md)
    command = shlex.join(["python", "benchmarks/table1.py", *sys.argv[1:]])
    info = machine()
    spread = (f"Mean +- standard deviation over seeds {args.seeds}." if len(seeds) > 1
              else f"One seed ({seeds[0]}): no standard deviation.")
    text = (f"# Table 1 on {args.data}\n\n{md}\n\n{spread} {budget(rows)} "
            f"Accuracy: test top-1 of the model's prediction (the prototype path, or the black box's linear head). "
            f"Duplicate pairs: prototypes projected onto the same training patch or closer than 0.01 RMS per channel; "
            f"distinct prototypes: those left when each group of duplicates counts once; purity: share of each "
            f"prototype's 10 nearest training images that are of its class; deletion gap: area under the predicted "
            f"logit when regions of the same sizes are hidden at random places minus when the top prototypes' regions "
            f"are (positive: the evidence mattered more than other places), by region rule (evidence: occlusion "
            f"sensitivity; activation: ProtoPNet's box of the similarity map) and fill (road: ROAD's noisy linear "
            f"imputation; mean: the training mean); on background: under 10% of the region's pixels on the object "
            f"(digits: pixels of at least 0.1 of the range); params: parameters the prediction uses. "
            f"Every figure comes from `nasx evaluate` on the run.\n\n{per_seed(rows)}\n\nCommand: `{command}`\n\n"
            f"Machine: {info['platform']}, {info['cpu_count']} CPUs, GPU: {info['gpu'] or 'none'}, Python "
            f"{info['python']}, torch {info['torch']}, {info['date']}.\n")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    results.with_suffix(".json").write_text(json.dumps({"command": command, "machine": info, "rows": rows},
                                                       indent=2) + "\n")
    print(f"\nwritten to {results}", file=sys.stderr)


if __name__ == "__main__":
    main()
