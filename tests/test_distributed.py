"""Data-parallel training (nasxserve.training.distributed) on the CPU: gloo, two processes, loopback.

Three layers of evidence:
- the sharding arithmetic, in one process (no process group needed);
- the distributed pieces against their single-process selves, in two spawned processes on a fixed
  model: evaluation and prototype projection give exactly the single-process result; gradients (weight
  step, first- and second-order architect, LeaSE) and the Hessian's dominant eigenvalue equal the
  full-batch single-process ones (float64, models in eval mode so that BatchNorm treats every sample on
  its own and a shard's gradient is a share of the full batch's);
- ``torchrun --nproc-per-node 2 -m nasxserve search`` then ``train --resume`` end to end: exit 0, one
  run directory, alpha identical on both ranks after every architecture step, and the report's test
  accuracy reproduced in one process from the checkpoint rank 0 wrote.
"""
from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import nasx_env, read_jsonl, tiny_config, write_yaml

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from nasxserve.data import load_dataset  # noqa: E402
from nasxserve.data.base import ImageSet  # noqa: E402
from nasxserve.errors import RunDirError  # noqa: E402
from nasxserve.nas.supernet import SearchNetwork  # noqa: E402
from nasxserve.protos.losses import LossWeights, Stage  # noqa: E402
from nasxserve.protos.model import ExplainableNet  # noqa: E402
from nasxserve.protos.projection import NearestPatches, merge_nearest, nearest_patches, project_prototypes  # noqa: E402
from nasxserve.training.architect import Architect  # noqa: E402
from nasxserve.training.distributed import (ARCH_TRACE_ENV, TIMEOUT_ENV, World, current_world,  # noqa: E402
                                            shard_bounds, sharded_batches, sharded_nearest_patches)
from nasxserve.training.hessian import dominant_eigenvalue  # noqa: E402
from nasxserve.training.lease import LeaseArchitect  # noqa: E402
from nasxserve.training.lease_deltas import DeltaStore  # noqa: E402
from nasxserve.training.rundir import ReplicaRunDir, RunDir  # noqa: E402
from nasxserve.training.steps import (evaluate, functional_stage_logits, functional_stage_loss,  # noqa: E402
                                      weight_step)

ARCH = ["features.alphas_normal", "features.alphas_reduce"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ one process: the arithmetic

def test_shards_cover_a_batch_in_rank_order_and_differ_by_at_most_one():
    for n in (1, 2, 7, 64):
        for size in (1, 2, 3, 5):
            bounds = [shard_bounds(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            lengths = [hi - lo for lo, hi in bounds]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
            assert sum(World(r, size).share(n) for r in range(size)) == pytest.approx(1.0)


def _images(n: int = 23, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8).numpy()
    return ImageSet(x, (torch.arange(n) % 3).numpy(), (0.5,), (0.25,))


def test_one_process_batches_are_exactly_imageset_batches():
    from nasxserve.data.augment import Augmentation

    images, augment = _images(), Augmentation("crop-flip", padding=1)
    expected = images.batches(5, True, torch.Generator().manual_seed(3), True, augment,
                              torch.Generator().manual_seed(4))
    got = sharded_batches(images, 5, World(), True, torch.Generator().manual_seed(3), True, augment,
                          torch.Generator().manual_seed(4))
    pairs = list(zip(expected, got, strict=True))
    assert len(pairs) == 4
    for (xe, ye), (xg, yg) in pairs:
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_the_shards_of_every_rank_make_up_the_global_batches():
    images = _images()
    expected = list(images.batches(6, True, torch.Generator().manual_seed(1), drop_last=True))
    shards = [list(sharded_batches(images, 6, World(r, 3), True, torch.Generator().manual_seed(1), drop_last=True))
              for r in range(3)]
    assert all(len(s) == len(expected) == 3 for s in shards)
    for b, (x, y) in enumerate(expected):
        assert torch.equal(torch.cat([s[b][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[b][1] for s in shards]), y)
        assert [len(s[b][1]) for s in shards] == [2, 2, 2]


def test_merge_nearest_takes_the_smallest_distance_then_the_lower_sample_then_position():
    def part(distance, sample, position):
        m = len(distance)
        return NearestPatches(torch.tensor(distance), torch.tensor(sample), torch.tensor(position),
                              torch.tensor(sample, dtype=torch.float32)[:, None].expand(m, 2).clone(), (2, 2))

    late = part([1.0, 2.0, 3.0, 3.0], [40, 41, 42, 10], [0, 0, 0, 1])
    early = part([1.0, 1.5, 3.0, 3.0], [7, 8, 9, 10], [3, 3, 3, 2])
    for parts in ([early, late], [late, early]):          # whatever order the ranks report in
        best = merge_nearest(parts)
        assert best.sample.tolist() == [7, 8, 9, 10]
        assert best.position.tolist() == [3, 3, 3, 1]
        assert best.distance.tolist() == [1.0, 1.5, 3.0, 3.0]
        assert best.vector[:, 0].tolist() == [7.0, 8.0, 9.0, 10.0]


def test_scans_of_blocks_of_batches_merge_to_the_scan_of_all():
    model, images = _fixed_model(), _images(n=45)
    whole = nearest_patches(model, images, 4, torch.device("cpu"))
    merged = merge_nearest([nearest_patches(model, images, 4, torch.device("cpu"), batches=range(*b))
                            for b in ((6, 12), (0, 6))])
    for field in ("distance", "sample", "position", "vector"):
        assert torch.equal(getattr(merged, field), getattr(whole, field)), field
    assert merged.grid == whole.grid


def test_a_replica_run_directory_overrides_every_writing_method_and_writes_nothing(tmp_path: Path):
    readers = {"load_checkpoint", "read_metrics", "require_resumable", "search_snapshot", "lease_deltas", "unstarted"}
    public = {n for n in vars(RunDir) if not n.startswith("_") and callable(getattr(RunDir, n))}
    assert public - readers == {n for n in vars(ReplicaRunDir) if not n.startswith("_")}

    run = ReplicaRunDir(tmp_path / "run")
    run.create()
    run.write_text(run.config_path, "x")
    run.write_json(run.report_path, {})
    run.save_checkpoint({"a": torch.zeros(1)})
    run.append_metrics({"step": 1})
    run.truncate_metrics(0)
    run.prune_search_snapshots(range(0))
    run.save_array(run.lease_deltas(1), np.zeros(3, np.float32))
    run.prune_lease_deltas(())
    run.save_prototypes([], _images(), ["a", "b", "c"])
    assert not (tmp_path / "run").exists()


# ============================================================================ two spawned processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, check: str) -> None:
    """A spawned process: join a 2-process gloo group on the loopback, run ``check(world)``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        globals()[check](current_world())
    finally:
        dist.destroy_process_group()


def run_in_two_processes(check: Callable[[World], None]) -> None:
    """Run ``check`` on ranks 0 and 1; a failed assertion on either fails the test with its traceback."""
    mp.spawn(_entry, args=(_free_port(), check.__name__), nprocs=2, join=True)


def _fixed_model(dtype: torch.dtype = torch.float32, num_classes: int = 10) -> ExplainableNet:
    """A tiny NASXNet (3 cells, C = 4, 2-step cells) with alphas away from uniform, the same on every
    process (seeded), in eval mode."""
    torch.manual_seed(0)
    features = SearchNetwork(channels=4, layers=3, in_channels=1, steps=2, multiplier=2)
    model = ExplainableNet(features, num_classes=num_classes, prototypes_per_class=2, prototype_dim=4).to(dtype)
    with torch.no_grad():
        features.alphas_normal.normal_(0.0, 0.5)
        features.alphas_reduce.normal_(0.0, 0.5)
    return model.eval()


def _check_projection_and_evaluation(world: World) -> None:
    digits = load_dataset("digits", 8)
    first = digits.train.subset(torch.arange(64).numpy())
    doubled = digits.train.subset(torch.cat([torch.arange(64), torch.arange(64)]).numpy())
    # 13 batches of 16 split 7 / 6; and two identical halves of 4 batches each, one per rank, so that
    # every prototype's nearest distance is tied across the ranks (the lower sample must win)
    for images, bs in ((digits.train.subset(torch.arange(200).numpy()), 16), (doubled, 16)):
        single, spread = _fixed_model(), _fixed_model()
        expected = project_prototypes(single, images, bs, "cpu")
        got = project_prototypes(spread, images, bs, "cpu", sharded_nearest_patches(world))
        assert got == expected
        assert torch.equal(spread.prototype_layer.prototypes, single.prototype_layer.prototypes)
        assert torch.equal(spread.prototype_layer.prototype_class, single.prototype_layer.prototype_class)
        assert evaluate(spread, images, 16, torch.device("cpu"), world=world) == \
            evaluate(single, images, 16, torch.device("cpu"))
    assert all(r.sample < 64 for r in expected)
    assert expected == project_prototypes(_fixed_model(), first, 16, "cpu")


def test_projection_and_evaluation_equal_the_single_process_ones():
    run_in_two_processes(_check_projection_and_evaluation)


def _without_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by the identity. The search network's BatchNorm normalises
    with the batch's statistics even in eval mode, so a sample's loss depends on the rest of its batch;
    without it every sample's loss stands alone and a shard's gradient is exactly a share of the full
    batch's, which is what the reductions are to reproduce."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    return model


def _problem(world: World):
    """A float64 model without BatchNorm and 6 + 6 images, and this rank's shards (rows 0-2 and 3-5)."""
    model = _without_batchnorm(_fixed_model(torch.float64, num_classes=3))
    g = torch.Generator().manual_seed(1)
    full = (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2]),
            torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([2, 0, 1, 0, 1, 1]))
    lo, hi = world.shard_of(0, 6)
    return model, full, tuple(t[lo:hi] for t in full)


def _assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _architect_gradients(world: World, data: tuple, order: int, lease: bool) -> list[torch.Tensor]:
    """One architecture step's alpha gradient (as ``step`` applies it) and the audience's step gradient."""
    model, _, _ = _problem(world)
    weights = LossWeights(0.8, 0.001)
    loss = functional_stage_loss(model, Stage.JOINT, weights)
    reduce = world.gradient_reducer(6)
    if lease:
        torch.manual_seed(5)
        audience = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
        architect = LeaseArchitect(model, loss, ARCH, order, fd_radius=1e-6, reduce_gradients=reduce,
                                   logits=functional_stage_logits(model, Stage.JOINT, weights), audience=audience,
                                   gamma=0.7, audience_lr=0.1, delta_lr=2.0)
        architect.initial_delta = lambda x: 0.05 * torch.sin(7 * x)   # per sample, so shards agree
    else:
        architect = Architect(model, loss, ARCH, order, fd_radius=1e-6, reduce_gradients=reduce)
    w_opt = torch.optim.SGD([p for n, p in model.named_parameters() if n not in ARCH], lr=0.05, momentum=0.9,
                            weight_decay=3e-4)
    grads = architect.reduce_gradients(architect.gradient(*data, xi=0.05, w_optimizer=w_opt))
    # LeaSE also keeps the gradient of the audience's own step: it must be the global one too
    return grads + (list(architect._audience_grads) if lease else [])


def _check_gradients(world: World) -> None:
    model, full, shard = _problem(world)
    single, _, _ = _problem(World())
    for order in (1, 2):
        for lease in (False, True):
            _assert_close(_architect_gradients(world, shard, order, lease),
                          _architect_gradients(World(), full, order, lease), f"order {order}, lease {lease}")
    # the weight step: averaged gradients, then the same clipping and SGD step as on the full batch
    for net, (x, y), w in ((model, shard[:2], world), (single, full[:2], World())):
        params = [p for n, p in net.named_parameters() if n not in ARCH]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        weight_step(net, Stage.JOINT, x, y, opt, params, LossWeights(0.8, 0.001), 0.5,
                    reduce_gradients=w.gradient_reducer(6))
    _assert_close(list(model.parameters()), list(single.parameters()), "weights after a step")
    # the Hessian's dominant eigenvalue: shard losses weighted by their share, products summed
    estimates = []
    for w, (_, _, xv, yv), share in ((world, shard, 0.5), (World(), full, 1.0)):
        arch = Architect(model, functional_stage_loss(model, Stage.JOINT, LossWeights(0.8, 0.001)), ARCH)

        def loss(arch=arch, share=share, xv=xv, yv=yv):   # this iteration's values
            return share * arch.current_loss(xv, yv)
        estimates.append(dominant_eigenvalue([loss], arch.arch, iterations=8,
                                             tolerance=0, generator=torch.Generator().manual_seed(0),
                                             reduce=w.reducer(1.0)))
    assert estimates[0].value == pytest.approx(estimates[1].value, rel=1e-9)
    _assert_close(estimates[0].vector, estimates[1].vector, "eigenvector")


def test_gradients_and_hessian_equal_the_full_batch_ones():
    run_in_two_processes(_check_gradients)


def _lease_deltas_after_a_step(world: World, data: tuple, index: torch.Tensor) -> np.ndarray:
    """The Delta store (10 samples) after one LeaSE step on ``data``, rows ``index`` of it."""
    model, _, _ = _problem(world)
    weights = LossWeights(0.8, 0.001)
    torch.manual_seed(5)
    audience = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    store = DeltaStore(10, (1, 8, 8), seed=3, delta_init=0.05, gather_rows=world.gather_rows)
    architect = LeaseArchitect(model, functional_stage_loss(model, Stage.JOINT, weights), ARCH, 1, fd_radius=1e-6,
                               reduce_gradients=world.gradient_reducer(6), audience=audience, delta_lr=2.0,
                               logits=functional_stage_logits(model, Stage.JOINT, weights), deltas=store)
    architect.step(*data, xi=0.05, index=index)
    return store.values


def _check_lease_deltas(world: World) -> None:
    model, full, shard = _problem(world)
    index = torch.tensor([7, 2, 9, 0, 4, 5])
    lo, hi = world.shard_of(0, 6)
    got = _lease_deltas_after_a_step(world, shard, index[lo:hi])
    expected = _lease_deltas_after_a_step(World(), full, index)
    # every rank holds the whole global batch's delta'_i, as the single process does (the model has no
    # BatchNorm, so a sample's eq. (7) step does not depend on its batch); the other rows are untouched
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    untouched = [1, 3, 6, 8]
    assert np.array_equal(got[untouched], DeltaStore(10, (1, 8, 8), 3, 0.05).initial(np.array(untouched)))
    assert not np.allclose(got[index.numpy()], DeltaStore(10, (1, 8, 8), 3, 0.05).initial(index.numpy()))
    assert len(set(world.all_gather_object(got.tobytes()))) == 1, "the ranks' stores differ"


def test_lease_deltas_are_the_same_on_every_rank():
    run_in_two_processes(_check_lease_deltas)


def _check_collectives(world: World) -> None:
    # a weighted sum: shares 2/3 and 1/3 of a batch of 3; None stays None, channels-last stays so
    g = torch.full((2, 3, 2, 2), float(world.rank + 1)).contiguous(memory_format=torch.channels_last)
    out = world.weighted_sum([g, None], world.share(3))
    assert out[1] is None and out[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[0], torch.full_like(g, 2 / 3 * 1 + 1 / 3 * 2))
    # rank 0's parameters and buffers everywhere
    model = nn.BatchNorm2d(3)
    with torch.no_grad():
        model.weight.fill_(world.rank)
        model.running_mean.fill_(10 + world.rank)
    world.broadcast_state(model, buffers_only=True)
    assert model.running_mean.eq(10).all() and model.weight.eq(world.rank).all()
    world.broadcast_state(model)
    assert model.weight.eq(0).all()
    # rank 0's failure reaches rank 1 as the same error, instead of leaving it waiting
    def create() -> None:
        raise RunDirError("no room")

    with pytest.raises(RunDirError, match="no room"):
        world.run_on_main(create)
    assert world.broadcast_object(f"rank {world.rank}") == "rank 0"


def test_collectives_average_broadcast_and_share_failures():
    run_in_two_processes(_check_collectives)


# ============================================================================ torchrun, end to end

def torchrun(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m nasxserve ARGS`` on the loopback, rendezvous on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "nasxserve", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_search_then_resumed_train(tmp_path: Path):
    trace = tmp_path / "trace"
    env = nasx_env()
    env.update({ARCH_TRACE_ENV: str(trace), TIMEOUT_ENV: "120", "OMP_NUM_THREADS": "1"})
    # first order (second order and LeaSE are compared exactly above), the Hessian tracked briefly, and
    # 512 search images: 128 for the weights (2 global batches of 64 an epoch), 384 for alpha
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(
        data={"augment": "crop-flip", "eval_batch_size": 64},
        search={"subset": 512, "stability": {"iterations": 3}},
        retrain={"epochs_joint": 1, "epochs_finetune": 1}))

    searched = torchrun(["search", "--data", "digits", "--config", config, "--out", "run", "--quiet"], tmp_path, env)
    assert searched.returncode == 0, searched.stderr[-4000:]
    trained = torchrun(["train", "--resume", "run", "--quiet"], tmp_path, env)
    assert trained.returncode == 0, trained.stderr[-4000:]

    # one run directory, written by rank 0 alone: every epoch and projection logged once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml", "trace"]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "genotype.json", "metrics.jsonl",
                                                     "prototypes", "report.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.pt", "last.pt", "search-epoch-001.pt", "search-epoch-002.pt", "search-epoch-003.pt"]
    rows = read_jsonl(run / "metrics.jsonl")
    epochs = [(r["phase"], r["epoch"], r["step"]) for r in rows if "event" not in r]
    assert epochs == [("search", 1, 1), ("search", 2, 2), ("search", 3, 3), ("retrain", 1, 4), ("retrain", 2, 5)]
    assert [r["phase"] for r in rows if r.get("event") == "projection"] == ["search", "retrain"]
    report = json.loads((run / "report.json").read_text())
    assert json.loads(trained.stdout) == report["test"]          # printed once, by rank 0

    # alpha identical on both ranks after every architecture step (3 epochs of 2 steps)
    lines = [(trace / f"arch-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(lines[0]) == 6 and lines[0] == lines[1]
    assert len({line.split()[2] for line in lines[0]}) == 6           # and it moved at every step

    # the test accuracy two processes reported is what one process computes from rank 0's last.pt
    from nasxserve.nas.genotype import Genotype
    from nasxserve.nas.network import GenotypeNetwork
    from nasxserve.training.config_loading import load_config

    saved = load_config(run / "config.yaml")
    data = load_dataset("digits", saved.data.image_size)
    genotype = Genotype.from_json((run / "genotype.json").read_text())
    model = ExplainableNet(GenotypeNetwork(genotype, saved.retrain.channels, saved.retrain.layers, data.in_channels,
                                           data.num_classes), data.num_classes, saved.model.prototypes_per_class,
                           saved.model.prototype_dim, saved.model.eps)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"])
    model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, data.test, 64, torch.device("cpu"), channels_last=True)
    assert (result.acc, result.aux_acc, result.n) == (report["test"]["prototype_acc"], report["test"]["aux_acc"], 360)
