"""Wall time and test accuracy of ``nasx train --preset cpu`` end to end on the CIFAR-10 subset.

Runs the CLI as a user would (search, retrain, projections, report) in a fresh process on a temporary
run directory and prints one JSON line: wall time, the report's test accuracies, and whether the goal
holds (at least 45% test accuracy of the prototype path within 15 minutes).

    python benchmarks/cifar10_cpu.py [--data imagefolder:../shared/data/cifar10-mini] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_ACCURACY = 0.45
GOAL_SECONDS = 15 * 60


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="imagefolder:../shared/data/cifar10-mini")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    nasx = Path(sys.executable).with_name("nasx")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run([str(nasx), "train", "--data", a.data, "--preset", "cpu", "--threads", str(a.threads),
                        "--seed", str(a.seed), "--out", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    test = report["test"]
    print(json.dumps({
        "data": a.data, "preset": "cpu", "seed": a.seed, "threads": a.threads, "wall_s": round(wall, 1),
        "test_prototype_acc": test["prototype_acc"], "test_aux_acc": test["aux_acc"], "n_test": test["n"],
        "genotype": report["genotype_darts"],
        "goal_met": test["prototype_acc"] >= GOAL_ACCURACY and wall <= GOAL_SECONDS,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
