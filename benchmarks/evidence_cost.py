"""What the evidence region rule costs on a large input, without training a large model.

A stand-in for a 224 x 224 bundle: torchvision's ResNet-18 features (ProtoPNet's default backbone, a 7 x 7
latent grid at 224) exported to ONNX and run by ONNX Runtime. Times, as medians: one image through the
model; building the rule's batch (the image and one hidden copy per block of the grid and of the grid shifted by
half a block, ``nasxserve.regions.evidence_batch``);
running that batch; and boxing five "prototypes" from its outputs (``nasxserve.regions.evidence_boxes``), with
the maximum over positions of five latent channels standing in for the similarities; and, with ``--lanes N``
over 1, running the batch cut into N parts side by side on N threads as ``nasx serve`` does
(``nasxserve.serve.batcher``). Prints JSON.

    python benchmarks/evidence_cost.py [--size 224 --threads 1 --lanes 2]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from nasxserve.regions import evidence_batch, evidence_boxes
from nasxserve.serve.batcher import MIN_PART, cuts


def median_ms(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return round(float(np.median(samples)) * 1e3, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads")
    p.add_argument("--lanes", type=int, default=1, help="model calls side by side, each on --threads threads")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()

    features = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]).eval()
    onnx = io.BytesIO()
    torch.onnx.export(features, torch.zeros(1, 3, a.size, a.size), onnx, input_names=["x"], output_names=["z"],
                      dynamic_axes={"x": {0: "batch"}, "z": {0: "batch"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    session = ort.InferenceSession(onnx.getvalue(), options, providers=["CPUExecutionProvider"])
    latent_hw = tuple(int(v) for v in session.run(None, {"x": np.zeros((1, 3, a.size, a.size), np.float32)})[0]
                      .shape[2:])
    x = np.random.default_rng(0).standard_normal((3, a.size, a.size)).astype(np.float32)
    batch = evidence_batch(x, latent_hw)
    similarities = session.run(None, {"x": batch})[0][:, :5].max(axis=(2, 3))          # (1 + G, 5)
    edges = cuts(len(batch), a.lanes, MIN_PART)
    pool = ThreadPoolExecutor(a.lanes)

    def run_in_lanes() -> None:
        list(pool.map(lambda ab: session.run(None, {"x": batch[ab[0]:ab[1]]}), zip(edges[:-1], edges[1:])))

    print(json.dumps({
        "input": [3, a.size, a.size], "latent_grid": list(latent_hw), "threads": a.threads,
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "one_image_ms": median_ms(lambda: session.run(None, {"x": x[None]}), a.runs),
        "evidence_batch_images": len(batch),
        "evidence_batch_build_ms": median_ms(lambda: evidence_batch(x, latent_hw), a.runs),
        "evidence_batch_run_ms": median_ms(lambda: session.run(None, {"x": batch}), a.runs),
        "evidence_boxes_ms": median_ms(lambda: evidence_boxes(similarities, latent_hw, (a.size, a.size)), a.runs),
        "lanes": a.lanes, "evidence_batch_parts": len(edges) - 1,
        "evidence_batch_run_in_lanes_ms": median_ms(run_in_lanes, a.runs),
    }))


if __name__ == "__main__":
    main()
