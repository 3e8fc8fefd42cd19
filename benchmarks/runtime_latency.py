"""Inference latency of one bundle on CPU: ONNX Runtime vs eager PyTorch vs TorchScript.

For batch 1 and batch 32, every engine runs the same prepared input ``--runs`` times, all with the
same number of intra-op threads. The runs come in ``--rounds`` blocks per engine, the engines taking
turns block by block, each block after ``--warmup`` untimed calls: load from other processes on a
shared machine falls on all engines alike, yet no engine's idle worker threads (ONNX Runtime spins
its pool after each call) run while another engine is timed. Prints one
JSON object with p50 / p99 milliseconds per call and the speed-up of ONNX Runtime over eager PyTorch.
Also timed: ``runtime_predict``, the whole ``Bundle.predict`` of one PNG (decode, convert, resize,
normalise, run, rank), and ``runtime_explain_<rule>``, the whole ``Bundle.explain`` of it with five prototypes'
boxes by each region rule (:mod:`nasxserve.regions`; ``evidence`` runs one more batch of at most 114 images).

    python benchmarks/runtime_latency.py BUNDLE [--runs 300 --threads 2]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nasxserve.export.bundle import load_pytorch_model
from nasxserve.export.graph import InferenceNet, load_torchscript
from nasxserve.regions import REGION_RULES
from nasxserve.runtime import load_bundle


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "runs": len(ms)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--runs", type=int, default=300, help="timed calls per engine and batch size")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each block")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every engine")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.bundle, provider="cpu", threads=a.threads)
    eager = InferenceNet(load_pytorch_model(a.bundle))
    script = load_torchscript(a.bundle / "model.ts")
    c, h, w = bundle.channels, bundle.height, bundle.width
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w) if c == 1 else (h, w, 3), dtype=np.uint8)).save(png, "PNG")
    png_bytes = png.getvalue()

    result: dict = {"bundle": str(a.bundle), "input": [c, h, w], "threads": a.threads,
                    "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": _ort_version(),
                    "provider": bundle.provider, "batches": {}}
    for batch in (1, 32):
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        xt = torch.from_numpy(x)
        engines = {"onnxruntime": lambda: bundle.run(x), "pytorch_eager": lambda: eager(xt),
                   "torchscript": lambda: script(xt)}
        if batch == 1:
            engines["runtime_predict"] = lambda: bundle.predict([png_bytes], top_k=5)
            for rule in REGION_RULES:
                engines[f"runtime_explain_{rule}"] = (
                    lambda rule=rule: bundle.explain([png_bytes], top_prototypes=5, regions=rule))
        samples: dict[str, list[float]] = {name: [] for name in engines}
        per_block = max(1, a.runs // a.rounds)
        with torch.inference_mode():
            for _ in range(a.rounds):
                for name, fn in engines.items():
                    for _ in range(a.warmup):
                        fn()
                    samples[name] += [timed(fn) for _ in range(per_block)]
        stats = {name: percentiles(s) for name, s in samples.items()}
        stats["onnxruntime_speedup_vs_eager_p50"] = round(stats["pytorch_eager"]["p50_ms"]
                                                          / stats["onnxruntime"]["p50_ms"], 2)
        result["batches"][str(batch)] = stats
    print(json.dumps(result))


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


if __name__ == "__main__":
    main()
