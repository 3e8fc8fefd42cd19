"""Search strategies: PC-DARTS' partial channels and edge normalisation, P-DARTS' operation dropping, skip
dropout and skip limit, and a short search from the CLI with each strategy (LeaSE's gradient: test_lease.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nasxserve.nas.genotype import Genotype, load_genotype
from nasxserve.nas.ops import PRIMITIVES
from nasxserve.nas.supernet import MixedOp, SearchNetwork, channel_shuffle
from nasxserve.training.config_loading import load_config
from nasxserve.training.strategies import build_strategy
from nasxserve.training.strategies.p_darts import derive_limiting_skips, drop_operations

from conftest import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(**pc):
    """A DARTS network and a PC-DARTS one with identical parameters (float64, 8x8 grey inputs)."""
    torch.manual_seed(0)
    darts = SearchNetwork(channels=4, layers=3, in_channels=1, steps=2, multiplier=2).double()
    with torch.no_grad():
        darts.alphas_normal.normal_(0, 0.5)
        darts.alphas_reduce.normal_(0, 0.5)
    partial = SearchNetwork(channels=4, layers=3, in_channels=1, steps=2, multiplier=2, **pc).double()
    partial.load_state_dict(darts.state_dict(), strict=not pc.get("edge_normalisation", False))
    return darts, partial


def test_pc_darts_with_k1_is_darts_exactly():
    """Same values bit for bit; gradients to float64 rounding (the shuffle's reshapes change memory
    layouts, so backward kernels may sum in another order)."""
    darts, pc = _pair(partial_channels=1)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    out_d, out_p = darts(x), pc(x)
    assert torch.equal(out_d, out_p)
    g_d = torch.autograd.grad(out_d.square().sum(), list(darts.parameters()))
    g_p = torch.autograd.grad(out_p.square().sum(), list(pc.parameters()))
    for a, b in zip(g_d, g_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert darts.genotype() == pc.genotype()


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channels_mix_a_quarter_and_pass_the_rest_through_shuffled(stride):
    """K=4 on 8 channels: channels 0-1 are mixed, 2-7 bypass (max-pooled when strided); after the shuffle
    output channel 4 * i + g holds group g's i-th channel."""
    torch.manual_seed(1)
    op = MixedOp(8, stride, partial=4).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    w = F.softmax(torch.randn(len(PRIMITIVES), dtype=torch.float64), 0)
    out = op(x, w)
    bypass = x[:, 2:] if stride == 1 else F.max_pool2d(x[:, 2:], 2, 2)
    unshuffled = out.reshape(2, 2, 4, *out.shape[2:]).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(unshuffled[:, 2:], bypass, rtol=0, atol=0)
    reference = MixedOp(2, stride).double().eval()
    reference.load_state_dict(op.state_dict())
    torch.testing.assert_close(unshuffled[:, :2], reference(x[:, :2], w))
    assert torch.equal(channel_shuffle(torch.arange(8.0).reshape(1, 8, 1, 1), 4).flatten(),
                       torch.tensor([0.0, 2, 4, 6, 1, 3, 5, 7]))


def test_edge_normalisation_weighs_each_nodes_inputs_and_ranks_edges():
    darts, pc = _pair(partial_channels=1, edge_normalisation=True)
    with torch.no_grad():
        pc.betas_normal.copy_(torch.tensor([0.3, -0.2, 1.0, 0.1, -0.5], dtype=torch.float64))
    e = pc.edge_weights(pc.betas_normal)
    torch.testing.assert_close(e[:2], F.softmax(pc.betas_normal[:2], 0))
    torch.testing.assert_close(e[2:], F.softmax(pc.betas_normal[2:], 0))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    cell = pc.cells[0]
    s = pc.stem(x)
    w = F.softmax(pc.alphas_normal, -1)
    states = [cell.preprocess0(s), cell.preprocess1(s)]
    node2 = sum(e[j] * cell.edges[j](states[j], w[j]) for j in range(2))
    states.append(node2)
    node3 = sum(e[2 + j] * cell.edges[2 + j](states[j], w[2 + j]) for j in range(3))
    torch.testing.assert_close(cell(s, s, w, e), torch.cat([node2, node3], 1))
    # genotype: an edge with a strong operation but a tiny beta loses its place
    with torch.no_grad():
        pc.alphas_normal.zero_()
        pc.alphas_normal[2:5, PRIMITIVES.index("sep_conv_3x3")] = torch.tensor([3.0, 2.0, 1.0])
        pc.betas_normal.copy_(torch.tensor([0.0, 0.0, -5.0, 0.0, 0.0], dtype=torch.float64))
    node3_inputs = sorted(j for _, j in pc.genotype().normal[2:4])
    assert node3_inputs == [1, 2]
    darts.load_state_dict({k: v for k, v in pc.state_dict().items() if not k.startswith("betas")})
    assert sorted(j for _, j in darts.genotype().normal[2:4]) == [0, 1]


def test_drop_operations_keeps_exactly_the_strongest():
    rng = np.random.default_rng(0)
    weights = rng.random((14, len(PRIMITIVES)))
    kept = drop_operations(weights, [PRIMITIVES] * 14, 5)
    for e, ops in enumerate(kept):
        assert len(ops) == 5
        assert set(ops) == {PRIMITIVES[i] for i in np.argsort(-weights[e])[:5]}
        assert list(ops) == sorted(ops, key=PRIMITIVES.index)
    again = drop_operations(weights, kept, 3)
    assert all(len(ops) == 3 and set(ops) <= set(k) for ops, k in zip(again, kept))
    with pytest.raises(ValueError, match="cannot keep 4"):
        drop_operations(weights, again, 4)


def test_p_darts_stage_transition_builds_the_next_network_on_the_kept_operations():
    cfg = load_config(overrides={"search": {"strategy": "p-darts", "channels": 4,
                                            "p_darts": {"layers": [3, 4, 5]}}}).search
    strategy = build_strategy(cfg, in_channels=1)
    assert strategy.networks == 3
    torch.manual_seed(0)
    first = strategy.build(0, None)
    with torch.no_grad():
        first.alphas_normal.normal_(0, 1)
        first.alphas_reduce.normal_(0, 1)
    kept = strategy.next_candidates(first, 0)
    w = first.mixing_weights()
    for kind in ("normal", "reduce"):
        for e, ops in enumerate(kept[kind]):
            assert set(ops) == {PRIMITIVES[i] for i in np.argsort(-w[kind][e])[:5]}
    second = strategy.build(1, kept)
    assert len(second.cells) == 4 and second.alphas_normal.shape == (14, 5)
    mixed = [m for m in second.modules() if isinstance(m, MixedOp)]
    assert all(len(m._ops) == 5 for m in mixed)
    assert second.cells[0].edges[3].candidates == kept["normal"][3]
    assert second(torch.randn(2, 1, 16, 16)).shape[0] == 2
    third = strategy.build(2, strategy.next_candidates(second, 1))
    assert third.alphas_reduce.shape == (14, 3) and len(third.cells) == 5
    # the genotype reads the dropped operations as absent
    assert all(op in third.candidates["normal"][0] for op, j in third.genotype().normal[:2] if j == 0)


def test_skip_dropout_decays_over_the_stage_and_acts_only_in_training():
    cfg = load_config(overrides={"search": {"strategy": "p-darts"}}).search
    strategy = build_strategy(cfg, in_channels=1)
    net = SearchNetwork(channels=4, layers=3, in_channels=1)
    assert strategy.begin_epoch(net, 1, 0, 10)["skip_dropout"] == pytest.approx(0.4 * 9 / 10)
    assert strategy.begin_epoch(net, 2, 9, 10)["skip_dropout"] == 0.0
    op = MixedOp(4, 1, candidates=("skip_connect",)).train()
    op.skip_dropout = 0.5
    x = torch.ones(1, 4, 8, 8)
    one = torch.ones(1)
    assert (op(x, one) == 0).any() and set(op(x, one).unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(op.eval()(x, one), x)


def test_skip_limit_replaces_the_weakest_skips_by_their_runner_up():
    """Four nodes each choose skip on their strongest edge; the two weakest skips give way to their edge's
    next operation, which still beats the node's other inputs, so the edges chosen stay the same."""
    w = np.full((14, len(PRIMITIVES)), 0.01)
    skip, sep, dil = (PRIMITIVES.index(n) for n in ("skip_connect", "sep_conv_3x3", "dil_conv_3x3"))
    starts = [0, 2, 5, 9]
    strengths = [0.9, 0.8, 0.7, 0.6]
    for start, s in zip(starts, strengths):
        w[start, skip] = s             # edge from input 0: skip
        w[start, sep] = 0.3            # ... and its runner-up
        w[start + 1, dil] = 0.5        # edge from input 1: a convolution
    g = derive_limiting_skips(w, w, steps=4, multiplier=4, max_skips=2)
    assert g.count("skip_connect")["normal"] == 2
    assert [sorted(j for _, j in g.normal[2 * i:2 * i + 2]) for i in range(4)] == [[0, 1]] * 4
    firsts = [dict((j, op) for op, j in g.normal[2 * i:2 * i + 2])[0] for i in range(4)]
    assert firsts == ["skip_connect", "skip_connect", "sep_conv_3x3", "sep_conv_3x3"]
    assert g.count("skip_connect")["reduce"] == 4     # the limit is the normal cell's only


def test_skip_limit_ranks_a_nodes_edges_again_after_dropping_a_skip():
    """Node 3's skip from input 0 (0.9) is the weakest of three skips; without it that edge is worth its
    runner-up's 0.1, below input 2's 0.5, so node 3 takes inputs 1 and 2 (P-DARTS' keep_2_branches on the
    edited weights), not 0 and 1 with a weak convolution from input 0."""
    w = np.full((14, len(PRIMITIVES)), 0.01) + np.random.default_rng(0).uniform(0, 1e-3, (14, len(PRIMITIVES)))
    skip, sep, dil = (PRIMITIVES.index(n) for n in ("skip_connect", "sep_conv_3x3", "dil_conv_3x3"))
    w[0, skip], w[1, skip] = 0.95, 0.92       # node 2: two strong skips, kept
    w[0, sep], w[1, sep] = 0.03, 0.03
    w[2, skip], w[2, sep] = 0.9, 0.1          # node 3, input 0: the weakest skip, a weak runner-up
    w[3, dil], w[4, sep] = 0.8, 0.5           # node 3, inputs 1 and 2
    g = derive_limiting_skips(w, w, steps=4, multiplier=4, max_skips=2)
    assert sorted(g.normal[2:4], key=lambda edge: edge[1]) == [("dil_conv_3x3", 1), ("sep_conv_3x3", 2)]
    assert g.count("skip_connect")["normal"] == 2
    assert _by_input(g) == _reference_skip_limit(w, max_skips=2).normal


def _by_input(genotype: Genotype) -> tuple[tuple[str, int], ...]:
    """The normal cell's edges with each node's two in input order (ours lists the stronger first)."""
    return sum((tuple(sorted(genotype.normal[2 * i:2 * i + 2], key=lambda edge: edge[1]))
                for i in range(genotype.steps)), ())


def _reference_skip_limit(weights: np.ndarray, max_skips: int) -> Genotype:
    """chenxin061/pdarts train_search.py's skip restriction, transcribed on the switches it works on (14
    edges, 4 nodes): ``keep_1_on`` + ``keep_2_branches`` give the genotype; while ``check_sk_number`` counts
    too many skips, ``delete_min_sk_prob`` zeroes the weakest chosen skip and the two run again."""
    skip = PRIMITIVES.index("skip_connect")
    switches_bk = weights > 0                         # the operations each edge still holds
    probs = np.where(switches_bk, weights, 0.0)
    probs[:, 0] = 0.0                                 # "remove all Zero operations"

    def keep_1_on(probs):                             # each edge: its strongest non-none operation
        out = np.zeros_like(switches_bk)
        for i in range(14):
            held = [k for k in range(1, len(PRIMITIVES)) if switches_bk[i, k]]
            out[i, max(held, key=lambda k: probs[i, k])] = True
        return out

    def keep_2_branches(switches, probs):             # each node: its two edges of largest max(probs)
        out = np.zeros_like(switches)
        start = 0
        for n in range(2, 6):
            ranked = sorted(range(n), key=lambda x: probs[start + x].max())
            for x in ranked[-2:]:
                out[start + x] = switches[start + x]
            start += n
        return out

    def parse(switches):
        edges, start = [], 0
        for n in range(2, 6):
            for j in range(n):
                edges += [(PRIMITIVES[k], j) for k in np.flatnonzero(switches[start + j])]
            start += n
        return edges

    switches = keep_2_branches(keep_1_on(probs), probs)
    while switches[:, skip].sum() > max_skips:        # check_sk_number
        sk_prob = np.where(switches[:, skip], probs[:, skip], 1.0)
        probs[int(np.argmin(sk_prob)), skip] = 0.0    # delete_min_sk_prob
        switches = keep_2_branches(keep_1_on(probs), probs)
    normal = parse(switches)
    by_node = [tuple(sorted(normal[2 * i:2 * i + 2], key=lambda edge: edge[1])) for i in range(4)]
    return Genotype(normal=sum(by_node, ()), normal_concat=(2, 3, 4, 5), reduce=sum(by_node, ()),
                    reduce_concat=(2, 3, 4, 5))


@pytest.mark.parametrize("seed", range(20))
def test_skip_limit_agrees_with_the_p_darts_reference(seed):
    """Random last-stage weights (3 operations per edge, skip often among them and strong): the same normal
    cell, node by node, as the transcribed reference."""
    rng = np.random.default_rng(seed)
    w = np.zeros((14, len(PRIMITIVES)))
    skip = PRIMITIVES.index("skip_connect")
    for e in range(14):
        others = [k for k in range(len(PRIMITIVES)) if k != skip]
        ops = [skip, *rng.choice(others, 2, replace=False)] if rng.random() < 0.7 else \
            rng.choice(len(PRIMITIVES), 3, replace=False)
        logits = rng.normal(0.0, 1.0, 3) + np.where(np.array(ops) == skip, 1.0, 0.0)
        w[e, ops] = np.exp(logits) / np.exp(logits).sum()
    for max_skips in (0, 1, 2):
        ours = derive_limiting_skips(w, w, steps=4, multiplier=4, max_skips=max_skips)
        assert _by_input(ours) == _reference_skip_limit(w, max_skips).normal
        assert ours.count("skip_connect")["normal"] <= max_skips


def test_pc_darts_freezes_the_architecture_until_its_start_epoch():
    cfg = load_config(overrides={"search": {"strategy": "pc-darts", "pc_darts": {"arch_start_epoch": 3}}}).search
    strategy = build_strategy(cfg, in_channels=3)
    assert [strategy.updates_architecture(e) for e in range(5)] == [False, False, False, True, True]
    net = strategy.build(0, None)
    assert net.arch_parameter_names() == ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    assert net.cells[0].edges[0].partial == 4


@pytest.mark.parametrize("strategy", ["darts", "pc-darts", "p-darts"])
def test_every_strategy_builds_search_networks_with_the_configured_reductions(strategy):
    search = {"strategy": strategy, "channels": 4, "layers": 5, "reductions": 1, "p_darts": {"layers": [5, 6, 7]},
              "pc_darts": {"partial_channels": 2}}
    cfg = load_config(overrides={"search": search}).search
    net = build_strategy(cfg, in_channels=1).build(0, None)
    assert [c.reduction for c in net.cells].count(True) == 1
    assert net(torch.randn(2, 1, 16, 16)).shape[-2:] == (8, 8)


@pytest.mark.parametrize("strategy", ["darts", "pc-darts", "p-darts"])
def test_every_strategy_derives_the_normal_cell_with_the_convolution_floor(strategy):
    """alphas that favour max pools everywhere: DARTS' derivation keeps no convolution; with the floor the
    strategy's genotype holds exactly min_convolutions, the weakest pools having given way."""
    def derive(floor: int):
        cfg = load_config(overrides={"search": {"strategy": strategy, "channels": 4, "layers": 3,
                                                "min_convolutions": floor}}).search
        strategy_ = build_strategy(cfg, in_channels=1)
        net = strategy_.build(0, None)
        with torch.no_grad():
            net.alphas_normal.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
            net.alphas_normal[:, PRIMITIVES.index("max_pool_3x3")] += 3.0
            net.alphas_normal[:, PRIMITIVES.index("sep_conv_3x3")] += 1.0
        return strategy_.genotype(net)
    assert derive(0).parametric("normal") == 0
    assert derive(3).parametric("normal") == 3
    assert derive(3).count("sep_conv_3x3")["normal"] == 3


STRATEGY_RUNS = {
    "darts": ([], {}),
    "pc-darts": (["--strategy", "pc-darts"], {"pc_darts": {"arch_start_epoch": 1}}),
    "p-darts": (["--strategy", "p-darts"], {"p_darts": {"layers": [3, 3, 4], "arch_start_epoch": 1}}),
    "lease": (["--strategy", "lease"], {}),
    "pc-darts+lease, plain head": (["--strategy", "pc-darts", "--lease", "--head", "plain"],
                                   {"pc_darts": {"arch_start_epoch": 1}}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGY_RUNS))
def test_each_strategy_searches_digits_from_the_cli(name, nasx, tiny_yaml, tmp_path):
    flags, search = STRATEGY_RUNS[name]
    cfg = tiny_yaml(search={"epochs_adapt": 1, "epochs_joint": 1, "epochs_finetune": 0, "subset": 256,
                            "stability": {"batch_size": 16, "iterations": 2}, **search})
    out = tmp_path / "run"
    proc = nasx("search", "--config", cfg, "--out", out, "-q", *flags, timeout=600)
    assert proc.returncode == 0, proc.stderr
    genotype = load_genotype(str(out / "genotype.json"))
    assert json.loads(proc.stdout) == genotype.to_dict()
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r]
    assert all(math.isfinite(r["hessian_eigenvalue"]) for r in rows)   # tracked under every strategy
    if name == "p-darts":
        assert [r["network"] for r in rows] == [1, 1, 2, 2, 3, 3]
        drops = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "operations_dropped"]
        assert [d["keep"] for d in drops] == [5, 3]
        assert all(len(ops) == 3 for ops in drops[1]["candidates"]["normal"])
        assert genotype.count("skip_connect")["normal"] <= 2
        final = drops[1]["candidates"]
        for kind in ("normal", "reduce"):
            edges = getattr(genotype, kind)
            starts = [sum(2 + k for k in range(i)) for i in range(len(edges) // 2)]
            assert all(op in final[kind][starts[n // 2] + j] for n, (op, j) in enumerate(edges))
    if name.startswith("pc-darts"):
        assert [r["arch_updates"] for r in rows] == [False, True]
    if "lease" in name:
        assert all(r["audience_val_loss"] > 0 for r in rows if r["arch_updates"])
    if name.endswith("plain head"):
        assert {r["stage"] for r in rows} == {"adapt"}


@pytest.mark.slow
def test_p_darts_with_lease_resumes_across_a_stage_boundary_exactly(tmp_path):
    """Stopped right after the first network's last epoch, the search resumes into the second network
    (operations dropped from the checkpointed alphas) with the audience's weights and momentum, and ends
    where the uninterrupted search ends, bit for bit."""
    from conftest import tiny_config
    from test_training import TIMINGS, assert_same, load_pt, without

    from nasxserve.training.config_loading import config_from_dict
    from nasxserve.training.trainer import Trainer

    cfg = tiny_config(search={"strategy": "p-darts", "epochs_adapt": 1, "epochs_joint": 1, "epochs_finetune": 0,
                              "subset": 256,
                              "p_darts": {"layers": [3, 3], "keep": [3, 1], "skip_dropout": [0.1, 0.4],
                                          "arch_start_epoch": 1},
                              "lease": {"enabled": True, "audience": "mobilenet_v3_small"},
                              "stability": {"batch_size": 16, "iterations": 2}})
    reference = tmp_path / "reference"
    Trainer.fresh(config_from_dict(cfg), str(reference)).search()

    def stop_after_first_network(phase: str, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer.fresh(config_from_dict(cfg), str(resumed), on_epoch_end=stop_after_first_network).search()
    assert load_pt(resumed / "checkpoints" / "last.pt")["network"] == 0
    Trainer.resume(str(resumed)).search()

    a, b = load_pt(resumed / "checkpoints" / "last.pt"), load_pt(reference / "checkpoints" / "last.pt")
    assert a["network"] == b["network"] == 1 and a["candidates"] == b["candidates"]
    assert_same(a, b, "last.pt")
    assert a["audience"]["audience_opt"]["state"], "the audience's momentum is checkpointed"
    rows_a, rows_b = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert without(rows_a, *TIMINGS) == without(rows_b, *TIMINGS)
    assert [r.get("event") for r in rows_b].count("operations_dropped") == 1
    assert (resumed / "genotype.json").read_text() == (reference / "genotype.json").read_text()
