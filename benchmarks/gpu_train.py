"""Images/s and peak GPU memory of search and retrain steps at the papers' CIFAR-10 settings.

search:  first-order DARTS iteration (architecture step + weight step), joint stage (eq. 5), 16 initial
         channels, 8 cells, batch 64, 32x32 inputs, crop-flip augmentation on the device;
retrain: the DARTS_V2 cells (or --genotype), 20 cells, 36 channels, batch 96, auxiliary tower 0.4,
         drop-path 0.2, crop-flip + Cutout 16, joint stage.

Each row is one (phase, precision, memory format) setting in a fresh CUDA memory state: one warm-up
step (cuDNN benchmarking), then the median of ``--steps`` timed steps, synchronised. The images are
random uint8 CIFAR-shaped tensors that go through the same pinned-memory, on-device augmentation path
training uses.

    python benchmarks/gpu_train.py [--steps 20] [--precision bf16,fp32] [--memory-format channels_last,contiguous]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda[:N]; cpu only to check the script itself")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--phases", default="search,retrain")
    p.add_argument("--precision", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--memory-format", default="channels_last,contiguous")
    p.add_argument("--genotype", default="DARTS_V2")
    p.add_argument("--search-batch", type=int, default=64)
    p.add_argument("--retrain-batch", type=int, default=96)
    return p


def main() -> None:
    a = _parser().parse_args()
    import torch

    from nasxserve.data.augment import Augmentation
    from nasxserve.data.base import ImageSet
    from nasxserve.nas.genotype import load_genotype
    from nasxserve.protos.losses import LossWeights, Stage
    from nasxserve.protos.model import ExplainableNet, ModelSpec, build_model
    from nasxserve.training.architect import Architect
    from nasxserve.training.config_loading import load_config
    from nasxserve.training.precision import resolve_precision
    from nasxserve.training.strategies import build_strategy
    from nasxserve.training.steps import functional_stage_loss, weight_step

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_train.py needs a CUDA GPU (PyTorch sees none); --device cpu only checks the script")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = load_config(overrides={"data": {"spec": "cifar10"}}, preset="paper")
    gen = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=gen).numpy(),
                      torch.randint(0, 10, (2048,), generator=gen).numpy(),
                      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

    def search_setup(fmt):
        torch.manual_seed(0)
        features = build_strategy(cfg.search, 3).build(0, None)
        model = ExplainableNet(features, 10, prototypes_per_class=10, prototype_dim=32).to(device, memory_format=fmt)
        arch_names = [f"features.{n}" for n in features.arch_parameter_names()]
        params = [q for n, q in model.named_parameters() if n not in arch_names]
        opt = torch.optim.SGD(params, lr=0.025, momentum=0.9, weight_decay=3e-4)
        weights = LossWeights()
        architect = Architect(model, functional_stage_loss(model, Stage.JOINT, weights), arch_names, order=1)
        return model, params, opt, weights, architect, a.search_batch, Augmentation("crop-flip", padding=4)

    def retrain_setup(fmt):
        torch.manual_seed(0)
        r = cfg.retrain
        spec = ModelSpec(genotype=load_genotype(a.genotype), channels=r.channels, layers=r.layers,
                         reductions=r.reductions, in_channels=3, num_classes=10, prototypes_per_class=10,
                         prototype_dim=32, eps=1e-4, auxiliary_tower=True)
        model = build_model(spec).to(device, memory_format=fmt)
        model.features.drop_path_prob = r.drop_path
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=r.lr, momentum=0.9, weight_decay=r.weight_decay)
        return (model, params, opt, LossWeights(tower=r.auxiliary_tower), None, a.retrain_batch,
                Augmentation("crop-flip", padding=4, cutout=r.cutout))

    def measure(phase: str, prec_name: str, fmt_name: str) -> dict:
        fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
        precision = resolve_precision(prec_name, device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model, params, opt, weights, architect, bs, augment = \
            (search_setup if phase == "search" else retrain_setup)(fmt)
        model.train()

        def endless_batches():
            while True:
                yield from images.batches(bs, True, torch.Generator().manual_seed(1), drop_last=True, augment=augment,
                                          augment_generator=torch.Generator().manual_seed(2), device=device)

        batches = endless_batches()

        def step():
            x, y = next(batches)
            x = x.contiguous(memory_format=fmt)
            if architect is not None:
                with precision.autocast():
                    architect.step(x, y, x, y, 0.025, opt)
            weight_step(model, Stage.JOINT, x, y, opt, params, weights, 5.0, precision)

        step()
        times = []
        for _ in range(a.steps):
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {
            "phase": phase, "precision": precision.name, "memory_format": fmt_name, "batch": bs,
            "step_s_median": round(med, 4), "img_per_s": round(bs / med, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "date": dt.date.today().isoformat(),
        }

    for phase in a.phases.split(","):
        for prec_name in a.precision.split(","):
            for fmt_name in a.memory_format.split(","):
                print(json.dumps(measure(phase, prec_name, fmt_name)), flush=True)


if __name__ == "__main__":
    main()
