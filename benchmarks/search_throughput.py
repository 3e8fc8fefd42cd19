"""Images/s of one search iteration (architecture step + weight step) and peak memory, per strategy.

Defaults match the reference DARTS measurement in ../shared/tools/ref_darts_bench.py: 16x16 RGB input,
C=8, 5 cells, batch 64, 2 threads, stage 1 loss (cross-entropy of the global-pool + linear head, the
loss DARTS itself searches with). ``--stage joint`` times the NASXNet joint stage (eq. 5) instead.

One row is one strategy in a fresh process (so that peak memory is its own); ``--strategy all`` runs
every row in turn and prints the ratios the search-strategy goals are stated in. Each row is the median
of ``--steps`` timed iterations after one warm-up.

    python benchmarks/search_throughput.py [--strategy darts] [--order 1] [--size 16 --C 8 --layers 5 ...]
    python benchmarks/search_throughput.py --strategy all
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

ROWS = [  # (label, strategy, order, extra arguments)
    ("darts-1st", "darts", 1, []),
    ("darts-2nd", "darts", 2, []),
    ("pc-darts-1st K=4", "pc-darts", 1, []),
    ("p-darts-1st stage 2 (8 cells, 5 ops)", "p-darts", 1, ["--p-darts-stage", "2"]),
    ("p-darts-1st stage 3 (11 cells, 3 ops)", "p-darts", 1, ["--p-darts-stage", "3"]),
    ("lease-2nd resnet18", "lease", 2, []),
    ("lease-1st resnet18", "lease", 1, []),
]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=["darts", "pc-darts", "p-darts", "lease", "all"], default="darts")
    p.add_argument("--order", type=int, choices=[1, 2], default=1)
    p.add_argument("--p-darts-stage", type=int, choices=[1, 2, 3], default=1,
                   help="p-darts: time the network of this stage (published layers 5, 11, 17; here --layers "
                        "then +3, +6 cells, with 8, 5, 3 operations per edge)")
    p.add_argument("--audience", default="resnet18")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stage", choices=["adapt", "joint", "finetune"], default="adapt")
    p.add_argument("--channels-first", action="store_true", help="disable channels_last (for comparison)")
    return p


def run_all(argv: list[str]) -> None:
    """Every row in its own process, then the goal ratios."""
    common = [a for a in argv if a not in ("--strategy", "all")]
    rows = {}
    for label, strategy, order, extra in ROWS:
        out = subprocess.run([sys.executable, __file__, *common, "--strategy", strategy, "--order", str(order),
                              *extra], capture_output=True, text=True, check=True).stdout
        rows[label] = json.loads(out.strip().splitlines()[-1])
        rows[label]["row"] = label
        print(json.dumps(rows[label]), flush=True)
    d1, d2, pc, le = (rows[k] for k in ("darts-1st", "darts-2nd", "pc-darts-1st K=4", "lease-2nd resnet18"))
    print(json.dumps({
        "summary": True,
        "pc_darts_speedup_vs_darts_1st": round(pc["img_per_s"] / d1["img_per_s"], 2),
        "pc_darts_iteration_memory_vs_darts_1st": round(pc["iteration_peak_gib"] / d1["iteration_peak_gib"], 2),
        "lease_2nd_slowdown_vs_darts_2nd": round(le["iter_s_median"] / d2["iter_s_median"], 2),
    }))


def main() -> None:
    a = _parser().parse_args()
    if a.strategy == "all":
        run_all(sys.argv[1:])
        return

    import torch

    from nasxserve.protos.losses import LossWeights, Stage
    from nasxserve.protos.model import ExplainableNet
    from nasxserve.training.architect import Architect
    from nasxserve.training.config_loading import load_config
    from nasxserve.training.lease import LeaseArchitect, build_audience
    from nasxserve.training.strategies import build_strategy
    from nasxserve.training.steps import functional_stage_logits, functional_stage_loss, weight_step

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    stage = Stage(a.stage)
    cfg = load_config(overrides={"search": {
        "strategy": a.strategy, "channels": a.C, "layers": a.layers, "order": a.order,
        "p_darts": {"layers": [a.layers, a.layers + 3, a.layers + 6]}}}).search
    strategy = build_strategy(cfg, 3)
    candidates = None
    for index in range(a.p_darts_stage - 1):   # drop operations as the earlier stages would have
        candidates = strategy.next_candidates(strategy.build(index, candidates), index)
    features = strategy.build(a.p_darts_stage - 1, candidates)
    model = ExplainableNet(features, a.classes, prototypes_per_class=10, prototype_dim=32)
    fmt = torch.contiguous_format if a.channels_first else torch.channels_last
    model = model.to(memory_format=fmt)
    arch_names = [f"features.{n}" for n in features.arch_parameter_names()]
    params = [q for n, q in model.named_parameters() if n not in arch_names]
    w_opt = torch.optim.SGD(params, lr=0.025, momentum=0.9, weight_decay=3e-4)
    weights = LossWeights()
    loss = functional_stage_loss(model, stage, weights)
    if cfg.lease.enabled:
        audience = build_audience(a.audience, 3, a.classes).to(memory_format=fmt)
        architect = LeaseArchitect(model, loss, arch_names, order=a.order, audience=audience,
                                   logits=functional_stage_logits(model, stage, weights))
    else:
        architect = Architect(model, loss, arch_names, order=a.order)
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
    xv = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch,))
    yv = torch.randint(0, a.classes, (a.batch,))

    def iteration() -> None:
        architect.step(x, y, xv, yv, 0.025, w_opt)
        weight_step(model, stage, x, y, w_opt, params, weights, 5.0)

    before = _rss_gib()
    iteration()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({
        "impl": "nasx", "strategy": a.strategy, "order": a.order,
        **({"p_darts_stage": a.p_darts_stage, "cells": len(features.cells),
            "ops_per_edge": features.alphas_normal.shape[1]} if a.strategy == "p-darts" else {}),
        **({"partial_channels": cfg.pc_darts.partial_channels} if a.strategy == "pc-darts" else {}),
        **({"audience": a.audience} if cfg.lease.enabled else {}),
        "stage": stage.value, "size": a.size, "C": a.C, "layers": a.layers, "batch": a.batch,
        "threads": a.threads, "channels_last": not a.channels_first, "iter_s_median": round(med, 3),
        "img_per_s": round(a.batch / med, 2), "peak_rss_gib": round(peak, 2),
        "iteration_peak_gib": round(peak - before, 3),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
