"""Images/s of one first-order search iteration (architecture step + weight step) and peak memory.

Defaults match the reference DARTS measurement in ../shared/tools/ref_darts_bench.py: 16x16 RGB input,
C=8, 5 cells, batch 64, 2 threads, stage 1 loss (cross-entropy of the global-pool + linear head, the
loss DARTS itself searches with). ``--stage joint`` times the NASXNet joint stage (eq. 5) instead.
Prints one JSON line; the median of ``--steps`` timed iterations after one warm-up.

    python benchmarks/search_throughput.py [--size 16 --C 8 --layers 5 --batch 64 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.architect import Architect
from nasxserve.training.trainer import functional_stage_loss, weight_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stage", choices=[s.value for s in Stage], default="adapt")
    p.add_argument("--channels-first", action="store_true", help="disable channels_last (for comparison)")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    stage = Stage(a.stage)
    model = ExplainableNet(SearchNetwork(a.C, a.layers, 3), a.classes, prototypes_per_class=10, prototype_dim=32)
    fmt = torch.contiguous_format if a.channels_first else torch.channels_last
    model = model.to(memory_format=fmt)
    arch_names = ["features.alphas_normal", "features.alphas_reduce"]
    params = [q for n, q in model.named_parameters() if n not in arch_names]
    w_opt = torch.optim.SGD(params, lr=0.025, momentum=0.9, weight_decay=3e-4)
    weights = LossWeights()
    architect = Architect(model, functional_stage_loss(model, stage, weights), arch_names, order=1)
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
    xv = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch,))
    yv = torch.randint(0, a.classes, (a.batch,))

    def iteration() -> None:
        architect.step(x, y, xv, yv, 0.025, w_opt)
        weight_step(model, stage, x, y, w_opt, params, weights, 5.0)

    iteration()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "nasx", "stage": stage.value, "size": a.size, "C": a.C, "layers": a.layers, "batch": a.batch,
        "threads": a.threads, "channels_last": not a.channels_first, "iter_s_median": round(med, 3),
        "img_per_s": round(a.batch / med, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
