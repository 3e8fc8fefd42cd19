"""How a training slows when a second one shares the cores: ``nasx train`` alone, then two started together.

Runs the command ``--alone`` times by itself, then ``--pairs`` times twice at the same moment, each in fresh
processes on temporary run directories, and takes every wall time; a pair's ratio is its slower run over the
median time alone (``--alone-s`` gives that median from an earlier measurement instead, with ``--alone 0``).
Prints one JSON line: every time, the median ratio, and whether the goal holds (the median ratio at most
2.5, on a machine whose cores the pair shares).

    python benchmarks/shared_cores.py [--alone 1] [--pairs 3] [-- nasx train flags, e.g. --threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_RATIO = 2.5


def _start(out: Path, extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nasxserve", "train", "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _timed(runs: list[tuple[Path, list[str]]], env: dict[str, str]) -> list[float]:
    """Start every run at once; their wall times (each to its own exit)."""
    start = time.perf_counter()
    procs = [_start(out, extra, env) for out, extra in runs]
    times = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"nasx train failed ({proc.returncode}): {err.decode()[-2000:]}")
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alone", type=int, default=1, help="runs by themselves")
    p.add_argument("--pairs", type=int, default=3, help="pairs of runs started together")
    p.add_argument("--alone-s", type=float, action="append", default=[],
                   help="a time alone measured before (repeatable), counted with the runs made here")
    p.add_argument("extra", nargs="*", help="flags for nasx train (after --)")
    a = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}   # nasx's own thread default decides
    env["BENTOML_DO_NOT_TRACK"] = "True"
    alone, pairs = list(a.alone_s), []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.alone):
            alone.append(round(_timed([(Path(tmp) / f"alone-{r}", a.extra)], env)[0], 1))
            print(f"alone {r + 1}: {alone[-1]:.0f} s", file=sys.stderr)
        if not alone:
            raise SystemExit("no time alone: give --alone N or --alone-s SECONDS")
        for r in range(a.pairs):
            pairs.append([round(t, 1) for t in _timed([(Path(tmp) / f"pair-{r}-{i}", a.extra) for i in range(2)], env)])
            print(f"pair {r + 1}: {pairs[-1][0]:.0f} s and {pairs[-1][1]:.0f} s", file=sys.stderr)
    base = statistics.median(alone)
    ratios = [round(max(pair) / base, 3) for pair in pairs]
    median = statistics.median(ratios)
    print(json.dumps({
        "command": " ".join(["nasx", "train", *a.extra]), "alone_s": alone,
        "alone_measured_before_s": a.alone_s, "together_s": pairs, "ratios": ratios, "median_ratio": median,
        "goal_met": median <= GOAL_RATIO, "cores": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
